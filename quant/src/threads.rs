//! The rayon pool every public entry point runs in, with a knob for its size.

use crate::format::{QuantError, Result};
use rayon::{ThreadPool, ThreadPoolBuilder};
use std::cell::Cell;
use std::sync::{Arc, Mutex};

static POOL: Mutex<Option<Arc<ThreadPool>>> = Mutex::new(None);

/// Environment variable read on first use: the default thread count.
pub const THREADS_ENV: &str = "KVTUNER_QUANT_THREADS";

fn default_threads() -> usize {
    // An unparsable or zero value falls back to the core count rather than failing every call.
    std::env::var(THREADS_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n >= 1)
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

fn build(n: usize) -> Result<Arc<ThreadPool>> {
    ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("kvtuner-quant-{i}"))
        .build()
        .map(Arc::new)
        .map_err(|e| QuantError::value(format!("could not start {n} threads: {e}")))
}

fn pool() -> Arc<ThreadPool> {
    let mut g = POOL.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = g.as_ref() {
        return p.clone();
    }
    let p = build(default_threads()).or_else(|_| build(1)).expect("a one-thread rayon pool can always be built");
    *g = Some(p.clone());
    p
}

/// Most threads a pool may have (far above any core count; keeps a typo from starting a million).
pub const MAX_THREADS: i64 = 4096;

/// Sets the number of worker threads (1..=`MAX_THREADS`) used by later calls. Signed because
/// Python passes int64: the range check lives here only.
pub fn set_num_threads(n: i64) -> Result<()> {
    if n < 1 {
        return Err(QuantError::value(format!("n must be >= 1, got {n}")));
    }
    if n > MAX_THREADS {
        return Err(QuantError::value(format!("n must be at most {MAX_THREADS}, got {n}")));
    }
    let p = build(n as usize)?;
    *POOL.lock().unwrap_or_else(|p| p.into_inner()) = Some(p);
    Ok(())
}

pub fn get_num_threads() -> usize {
    pool().current_num_threads()
}

/// Runs `f` inside the pool so its `par_iter`s use the configured thread count.
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    pool().install(f)
}

thread_local! {
    static SERIAL: Cell<bool> = const { Cell::new(false) };
}

/// Below this many bytes of input a call runs on the calling thread: waking a pool thread costs
/// tens of microseconds, as much as the work itself.
pub const SERIAL_BELOW_BYTES: usize = 256 << 10;

/// Like `install`, but small jobs, and every job when one thread is configured, run inline on the
/// calling thread (the kernels then loop instead of using `par_iter`).
pub fn install_sized<R: Send>(work_bytes: usize, f: impl FnOnce() -> R + Send) -> R {
    let p = pool();
    if p.current_num_threads() > 1 && work_bytes >= SERIAL_BELOW_BYTES {
        return p.install(f);
    }
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            SERIAL.set(self.0);
        }
    }
    let _reset = Reset(SERIAL.replace(true));
    f()
}

/// True inside `install_sized`'s inline mode: kernels must not fan out to a rayon pool.
pub(crate) fn serial() -> bool {
    SERIAL.get()
}
