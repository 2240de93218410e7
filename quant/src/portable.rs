//! The portable kernels: plain scalar code for any CPU and any shape, and the reference every SIMD
//! family is tested against (same bytes). Slices are laid out as `kernel::quant_chunk` documents.

use crate::elem::Elem;
use crate::format::Config;
use crate::math::{code_of, get_code, group_params, put_code, CodeRange};

fn stats<E: Elem>(xs: impl Iterator<Item = E>) -> (bool, f32, f32) {
    let (mut fin, mut lo, mut hi) = (true, f32::INFINITY, f32::NEG_INFINITY);
    for v in xs {
        let f = v.to_f32();
        fin &= f.is_finite();
        lo = lo.min(f);
        hi = hi.max(f);
    }
    (fin, lo, hi)
}

pub(crate) fn quant_chunk<E: Elem>(
    cfg: &Config,
    c: usize,
    x: &[E],
    codes: &mut [u8],
    scales: &mut [u8],
    mins: &mut [u8],
) {
    let g = cfg.group_size;
    let es = E::DTYPE.nbytes();
    let bits = cfg.bits;
    let range = CodeRange::of(cfg);
    codes.fill(0);
    if cfg.axis == 0 {
        for gi in 0..x.len() / g {
            let xs = &x[gi * g..(gi + 1) * g];
            let (fin, lo, hi) = stats(xs.iter().copied());
            let p = group_params::<E>(cfg, fin, lo, hi);
            p.s_store.put(&mut scales[gi * es..]);
            if cfg.asym {
                p.m_store.put(&mut mins[gi * es..]);
            }
            for (j, v) in xs.iter().enumerate() {
                put_code(codes, gi * g + j, bits, code_of(v.to_f32(), p.div, p.m, range));
            }
        }
    } else {
        let units = x.len() / (g * c);
        let (mut pdiv, mut pm) = (vec![0f32; c], vec![0f32; c]);
        for u in 0..units {
            let xu = &x[u * g * c..(u + 1) * g * c];
            for ch in 0..c {
                let (fin, lo, hi) = stats((0..g).map(|r| xu[r * c + ch]));
                let p = group_params::<E>(cfg, fin, lo, hi);
                let gi = u * c + ch;
                p.s_store.put(&mut scales[gi * es..]);
                if cfg.asym {
                    p.m_store.put(&mut mins[gi * es..]);
                }
                pdiv[ch] = p.div;
                pm[ch] = p.m;
            }
            for r in 0..g {
                let row = u * g + r;
                for (ch, v) in xu[r * c..(r + 1) * c].iter().enumerate() {
                    put_code(codes, row * c + ch, bits, code_of(v.to_f32(), pdiv[ch], pm[ch], range));
                }
            }
        }
    }
}

pub(crate) fn dequant_chunk<E: Elem>(cfg: &Config, c: usize, codes: &[u8], scales: &[u8], mins: &[u8], out: &mut [E]) {
    let g = cfg.group_size;
    let es = E::DTYPE.nbytes();
    let bits = cfg.bits;
    let off = CodeRange::of(cfg).off;
    let meta = |gi: usize| -> (f32, f32) {
        let s = E::get(&scales[gi * es..]).to_f32();
        let m = if cfg.asym { E::get(&mins[gi * es..]).to_f32() } else { 0.0 };
        (s, m)
    };
    // x_hat = q * s + m in f32 (not fused), rounded once to the output dtype
    if cfg.axis == 0 {
        for gi in 0..out.len() / g {
            let (s, m) = meta(gi);
            for j in 0..g {
                let i = gi * g + j;
                out[i] = E::from_f32((get_code(codes, i, bits) as f32 - off) * s + m);
            }
        }
    } else {
        let units = out.len() / (g * c);
        let (mut ps, mut pm) = (vec![0f32; c], vec![0f32; c]);
        for u in 0..units {
            for ch in 0..c {
                (ps[ch], pm[ch]) = meta(u * c + ch);
            }
            for r in 0..g {
                let row = u * g + r;
                for (ch, y) in out[row * c..(row + 1) * c].iter_mut().enumerate() {
                    *y = E::from_f32((get_code(codes, row * c + ch, bits) as f32 - off) * ps[ch] + pm[ch]);
                }
            }
        }
    }
}
