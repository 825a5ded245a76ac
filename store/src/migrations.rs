//! The schema, embedded in the binary and applied with sqlx's migrator (one
//! set per SQL dialect; the application's queries are shared).

use std::borrow::Cow;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{AnyPool, SqlSafeStr};

use crate::StoreError;

const SQLITE: &[(i64, &str, &str)] = &[(1, "inspections", include_str!("../migrations/sqlite/0001_inspections.sql"))];
const POSTGRES: &[(i64, &str, &str)] =
    &[(1, "inspections", include_str!("../migrations/postgres/0001_inspections.sql"))];

pub(crate) async fn run(pool: &AnyPool, sqlite: bool) -> Result<(), StoreError> {
    let set = if sqlite { SQLITE } else { POSTGRES };
    let migrations = set
        .iter()
        .map(|&(version, name, sql)| {
            Migration::new(version, Cow::Borrowed(name), MigrationType::Simple, sql.into_sql_str(), false)
        })
        .collect();
    Migrator::with_migrations(migrations).run(pool).await?;
    Ok(())
}
