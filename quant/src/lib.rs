//! `kvtuner_quant`: group-wise integer quantization (2/4/8 bits) of KV-cache tensors
//! `[tokens, heads, head_dim]` into a versioned packed format (FORMAT.md).
//!
//! The core (everything but `python`) has no Python types; the PyO3 bindings live behind the
//! `python` cargo feature so `cargo test` runs without an interpreter.

// `x % n == 0` keeps the crate building on toolchains older than `is_multiple_of` (1.87).
#![allow(clippy::manual_is_multiple_of)]

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod elem;
pub mod format;
pub mod kernel;
mod math;
mod portable;
mod scratch;
pub mod threads;

#[cfg(feature = "python")]
mod python;

pub use elem::Elem;
pub use format::{packed_nbytes, Config, DType, ErrorKind, Header, Layout, QuantError, Result, Shape, HEADER_NBYTES};
pub use kernel::{
    dequantize_into, dequantize_pages, quantize, quantize_into, quantize_pages, unpack, PageRows, Unpacked,
};
pub use threads::{get_num_threads, set_num_threads};
