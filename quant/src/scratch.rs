//! Thread-local f32 scratch for the kernels' per-block statistics and parameters, so the per-page
//! calls of the page API do not allocate.

use std::cell::RefCell;

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// The thread-local scratch taken out for the life of the guard (put back on drop). A guard, not a
/// `with_scratch(|s| ..)` closure: closures do not inherit a `#[target_feature]` function's
/// features, so intrinsics inside one compile to calls once LLVM declines to inline the closure.
pub(crate) struct Scratch(Vec<f32>);

impl Scratch {
    /// At least `n` floats (contents unspecified).
    pub(crate) fn take(n: usize) -> Scratch {
        let mut v = SCRATCH.with_borrow_mut(std::mem::take);
        if v.len() < n {
            v.resize(n, 0.0);
        }
        Scratch(v)
    }

    /// The first `N * n` floats as `N` slices of `n`.
    pub(crate) fn split<const N: usize>(&mut self, n: usize) -> [&mut [f32]; N] {
        split_equal(&mut self.0, n)
    }
}

/// The first `N * n` elements of `s` as `N` slices of `n`.
pub(crate) fn split_equal<const N: usize>(s: &mut [f32], n: usize) -> [&mut [f32]; N] {
    let mut rest = &mut s[..N * n];
    std::array::from_fn(|_| {
        let (a, b) = std::mem::take(&mut rest).split_at_mut(n);
        rest = b;
        a
    })
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        SCRATCH.with_borrow_mut(|s| {
            if s.len() < v.len() {
                *s = v;
            }
        });
    }
}

impl std::ops::Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.0
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.0
    }
}
