//! Boomerang's shared core: the wire protocol (no IO), the delta model, hashing and
//! compression, the QUIC + TLS transport builders, the deployment PKI, durable-file
//! helpers and the configuration types every role shares.
//!
//! Nothing here owns a socket except [`transport`], and nothing here owns a file except
//! [`durable`] and [`pki`]; the rest is pure and tested in place.

pub mod config;
pub mod delta;
pub mod durable;
pub mod faults;
pub mod hash;
pub mod message;
pub mod pki;
pub mod seglog;
pub mod storage;
pub mod transport;
pub mod wire;

pub use delta::{Batch, Codec, Extent};
pub use hash::ChunkHash;
pub use message::{Message, Role, Tag, TagKind};
