//! thinfs: a copy-on-write snapshot filesystem.
//!
//! Layers, arrows pointing one way:
//! `cli` (binary) -> `daemon` -> `fuse` -> `engine` -> (`meta`, `backend`) -> `sys`.
#![warn(missing_docs)]

pub mod backend;
pub mod cli;
pub mod containerd;
pub mod daemon;
pub mod engine;
pub mod error;
pub mod fuse;
pub mod lograte;
pub mod meta;
pub mod service;
pub mod stream;
pub mod sys;
pub mod types;

pub use error::{Error, Result};
