//! One module per subcommand.

pub mod bench;
pub mod inspect;
pub mod plugin;
pub mod serve;
pub mod train;
