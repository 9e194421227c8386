//! volt-auth (work in progress)
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod cache;
mod config;
mod error;
mod oauth;

pub use cache::{GrantStats, Stats};
pub use config::{Api, ConfigError, Credentials, Endpoint, Environment};
pub use error::{Error, ErrorResponse, GrantType};

#[cfg(feature = "mock")]
#[cfg_attr(docsrs, doc(cfg(feature = "mock")))]
pub mod mock;
