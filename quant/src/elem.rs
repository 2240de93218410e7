//! Element types: conversions the math needs (round-to-nearest-even, round toward +infinity) and
//! little-endian (de)serialisation of metadata.

use crate::format::DType;
use half::{bf16, f16};

pub trait Elem: Copy + Send + Sync + PartialEq + 'static {
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    /// Rounds to nearest, ties to even (the output rounding of `x_hat`).
    fn from_f32(v: f32) -> Self;
    /// `M_up`: the smallest value of this type that is >= `v` (NaN stays NaN), so the largest element
    /// of a group never clamps.
    fn up(v: f32) -> Self;
    /// The canonical quiet NaN stored as the scale (and min) of a group holding NaN or Inf.
    fn nan() -> Self;
    fn zero() -> Self;
    fn put(self, out: &mut [u8]);
    fn get(b: &[u8]) -> Self;
}

macro_rules! half_like {
    ($t:ty, $dt:expr) => {
        impl Elem for $t {
            const DTYPE: DType = $dt;
            #[inline]
            fn to_f32(self) -> f32 {
                <$t>::to_f32(self)
            }
            #[inline]
            fn from_f32(v: f32) -> Self {
                <$t>::from_f32(v)
            }
            #[inline]
            fn up(v: f32) -> Self {
                let h = <$t>::from_f32(v);
                if h.to_f32() < v {
                    // Next representable value toward +inf; h is finite here (h < v rules out +inf).
                    let b = h.to_bits();
                    if b & 0x8000 == 0 {
                        <$t>::from_bits(b + 1)
                    } else if b == 0x8000 {
                        <$t>::from_bits(1)
                    } else {
                        <$t>::from_bits(b - 1)
                    }
                } else {
                    h
                }
            }
            #[inline]
            fn nan() -> Self {
                <$t>::from_bits($dt.nan_bits() as u16)
            }
            #[inline]
            fn zero() -> Self {
                <$t>::from_bits(0)
            }
            #[inline]
            fn put(self, out: &mut [u8]) {
                out[..2].copy_from_slice(&self.to_bits().to_le_bytes());
            }
            #[inline]
            fn get(b: &[u8]) -> Self {
                <$t>::from_bits(u16::from_le_bytes([b[0], b[1]]))
            }
        }
    };
}

half_like!(f16, DType::F16);
half_like!(bf16, DType::BF16);

impl Elem for f32 {
    const DTYPE: DType = DType::F32;
    #[inline]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline]
    fn from_f32(v: f32) -> Self {
        v
    }
    #[inline]
    fn up(v: f32) -> Self {
        v
    }
    #[inline]
    fn nan() -> Self {
        f32::from_bits(DType::F32.nan_bits())
    }
    #[inline]
    fn zero() -> Self {
        0.0
    }
    #[inline]
    fn put(self, out: &mut [u8]) {
        out[..4].copy_from_slice(&self.to_bits().to_le_bytes());
    }
    #[inline]
    fn get(b: &[u8]) -> Self {
        f32::from_bits(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}
