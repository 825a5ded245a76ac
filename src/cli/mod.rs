//! One module per subcommand.

pub mod bench;
pub mod eval;
pub mod export;
pub mod fit;
pub mod inspect;
pub mod keys;
pub mod models;
pub mod plugin;
pub mod serve;
pub mod sign;
pub mod train;
