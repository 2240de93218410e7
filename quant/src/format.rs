//! Parameters, the packed-blob layout and its fixed 64-byte header (see FORMAT.md, the normative text).
//!
//! Everything here is plain arithmetic on sizes with overflow checks: a header read from untrusted bytes
//! must produce an error, never a panic or an out-of-range slice.

use std::fmt;
use std::ops::Range;

/// Header magic: the first four bytes of every blob.
pub const MAGIC: [u8; 4] = *b"KVQT";
/// Format version written by this crate; a reader accepts only this one.
pub const VERSION: u16 = 1;
/// Fixed header size in bytes; body sections follow it.
pub const HEADER_NBYTES: usize = 64;
/// Sections (codes, scales, mins) start on multiples of this, relative to the blob start.
pub const SECTION_ALIGN: usize = 8;

/// Which Python exception an error maps to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    Value,
    Type,
}

/// An error naming the offending argument/field and the expected value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuantError {
    pub kind: ErrorKind,
    pub msg: String,
}

impl QuantError {
    pub fn value(msg: impl Into<String>) -> Self {
        QuantError { kind: ErrorKind::Value, msg: msg.into() }
    }
    pub fn type_(msg: impl Into<String>) -> Self {
        QuantError { kind: ErrorKind::Type, msg: msg.into() }
    }
}

impl fmt::Display for QuantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for QuantError {}

pub type Result<T> = std::result::Result<T, QuantError>;

/// Input dtype; the metadata (scale, min) is stored in the same dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F16 = 1,
    BF16 = 2,
    F32 = 3,
}

impl DType {
    pub fn nbytes(self) -> usize {
        match self {
            DType::F16 | DType::BF16 => 2,
            DType::F32 => 4,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F32 => "float32",
        }
    }
    pub fn from_name(s: &str) -> Result<DType> {
        match s {
            "float16" | "f16" | "half" => Ok(DType::F16),
            "bfloat16" | "bf16" => Ok(DType::BF16),
            "float32" | "f32" | "float" => Ok(DType::F32),
            _ => Err(QuantError::type_(format!("dtype must be one of 'float16', 'bfloat16', 'float32', got {s:?}"))),
        }
    }
    /// The canonical quiet NaN stored for a group holding NaN or Inf (FORMAT.md), as bits.
    pub fn nan_bits(self) -> u32 {
        match self {
            DType::F16 => 0x7E00,
            DType::BF16 => 0x7FC0,
            DType::F32 => 0x7FC0_0000,
        }
    }
    pub fn from_code(c: u8) -> Option<DType> {
        match c {
            1 => Some(DType::F16),
            2 => Some(DType::BF16),
            3 => Some(DType::F32),
            _ => None,
        }
    }
}

/// Quantization parameters (everything but dtype and shape).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub bits: u8,
    pub asym: bool,
    /// 0 = per-token groups along head_dim, 1 = per-channel groups along tokens.
    pub axis: u8,
    pub group_size: usize,
    /// Requested residual window: the last `residual_length` tokens are stored exactly.
    pub residual_length: usize,
}

/// `[tokens, heads, head_dim]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl Shape {
    /// A shape from a caller's integers (signed: Python passes int64); `Config::validate` checks
    /// the rest (heads and head_dim >= 1).
    pub fn new(tokens: i64, heads: i64, head_dim: i64) -> Result<Shape> {
        let dim = |name: &str, v: i64| {
            usize::try_from(v).map_err(|_| QuantError::value(format!("{name} must be >= 0, got {v}")))
        };
        Ok(Shape { tokens: dim("tokens", tokens)?, heads: dim("heads", heads)?, head_dim: dim("head_dim", head_dim)? })
    }

    /// Elements per token row (`heads * head_dim`); checked by `Layout::new`.
    pub fn row(&self) -> usize {
        self.heads * self.head_dim
    }
    pub fn numel(&self) -> Option<usize> {
        self.tokens.checked_mul(self.heads)?.checked_mul(self.head_dim)
    }
}

/// Largest group_size and residual_length: the header stores them as u32.
const U32_FIELD_MAX: i128 = u32::MAX as i128;

/// The range of each parameter, checked in one place for configurations built by callers
/// (`Config::new`) and read from headers (`Layout::new`). Values arrive widened (a Python int, a
/// header's u32) so that a negative or oversized value is reported as given.
fn check_params(bits: i128, axis: i128, group_size: i128, residual_length: i128) -> Result<()> {
    if !matches!(bits, 2 | 4 | 8) {
        return Err(QuantError::value(format!("bits must be 2, 4 or 8, got {bits}")));
    }
    if !matches!(axis, 0 | 1) {
        return Err(QuantError::value(format!("axis must be 0 (per-token) or 1 (per-channel), got {axis}")));
    }
    if group_size < 1 {
        return Err(QuantError::value(format!("group_size must be a positive integer, got {group_size}")));
    }
    if group_size > U32_FIELD_MAX {
        return Err(QuantError::value(format!("group_size must be at most {U32_FIELD_MAX}, got {group_size}")));
    }
    if residual_length < 0 {
        return Err(QuantError::value(format!("residual_length must be >= 0, got {residual_length}")));
    }
    if residual_length > U32_FIELD_MAX {
        return Err(QuantError::value(format!(
            "residual_length must be at most {U32_FIELD_MAX}, got {residual_length}"
        )));
    }
    Ok(())
}

impl Config {
    /// A configuration from a caller's integers (signed: Python passes int64), every range checked.
    pub fn new(bits: i64, asym: bool, axis: i64, group_size: i64, residual_length: i64) -> Result<Config> {
        check_params(bits.into(), axis.into(), group_size.into(), residual_length.into())?;
        // in range after the check
        Ok(Config {
            bits: bits as u8,
            asym,
            axis: axis as u8,
            group_size: group_size as usize,
            residual_length: residual_length as usize,
        })
    }

    /// Checks the parameters and their fit to a shape; messages name the argument and the expected value.
    pub fn validate(&self, shape: &Shape) -> Result<()> {
        check_params(self.bits.into(), self.axis.into(), self.group_size as i128, self.residual_length as i128)?;
        if shape.heads == 0 || shape.head_dim == 0 {
            return Err(QuantError::value(format!(
                "shape must have heads >= 1 and head_dim >= 1, got [{}, {}, {}]",
                shape.tokens, shape.heads, shape.head_dim
            )));
        }
        if shape.heads > u32::MAX as usize || shape.head_dim > u32::MAX as usize {
            return Err(QuantError::value("shape: heads and head_dim must fit in 32 bits"));
        }
        if self.axis == 0 && shape.head_dim % self.group_size != 0 {
            return Err(QuantError::value(format!(
                "group_size must divide head_dim ({}) for axis 0, got {}",
                shape.head_dim, self.group_size
            )));
        }
        Ok(())
    }

    pub fn levels(&self) -> u32 {
        (1u32 << self.bits) - 1
    }
    /// Symmetric codes range over [-qmax, qmax] and are stored offset by 2^(bits-1).
    pub fn qmax(&self) -> u32 {
        (1u32 << (self.bits - 1)) - 1
    }
    pub fn sym_offset(&self) -> u32 {
        1u32 << (self.bits - 1)
    }
}

fn pad(n: usize) -> Option<usize> {
    n.checked_add(SECTION_ALIGN - 1).map(|v| v / SECTION_ALIGN * SECTION_ALIGN)
}

/// Byte offsets of the body sections of one blob.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Tokens [0, nq) are quantized; tokens [nq, tokens) are stored exactly.
    pub nq: usize,
    /// Number of groups (= number of scales, and of mins when asymmetric).
    pub ngroups: usize,
    pub codes_off: usize,
    pub codes_len: usize,
    pub scales_off: usize,
    pub mins_off: usize,
    /// Bytes of each metadata array (unpadded).
    pub meta_len: usize,
    pub residual_off: usize,
    pub residual_len: usize,
    pub total: usize,
}

impl Layout {
    /// Computes the layout; errors (never panics) when a size overflows.
    pub fn new(cfg: &Config, dtype: DType, shape: &Shape) -> Result<Layout> {
        cfg.validate(shape)?;
        let overflow = || QuantError::value("shape too large: packed size overflows");
        let row = shape.heads.checked_mul(shape.head_dim).ok_or_else(overflow)?;
        let window = cfg.residual_length.min(shape.tokens);
        let before = shape.tokens - window;
        // Per-channel groups are whole runs of group_size tokens from token 0; a shorter tail is
        // stored exactly together with the window (never a group shorter than group_size).
        let nq = if cfg.axis == 0 { before } else { before / cfg.group_size * cfg.group_size };
        let qel = nq.checked_mul(row).ok_or_else(overflow)?;
        let ngroups = qel / cfg.group_size;
        let codes_len = qel.checked_mul(cfg.bits as usize).ok_or_else(overflow)?.div_ceil(8);
        let es = dtype.nbytes();
        let meta_len = ngroups.checked_mul(es).ok_or_else(overflow)?;
        let codes_off = HEADER_NBYTES;
        let scales_off = pad(codes_off.checked_add(codes_len).ok_or_else(overflow)?).ok_or_else(overflow)?;
        let after_scales = pad(scales_off.checked_add(meta_len).ok_or_else(overflow)?).ok_or_else(overflow)?;
        let (mins_off, residual_off) = if cfg.asym {
            (after_scales, pad(after_scales.checked_add(meta_len).ok_or_else(overflow)?).ok_or_else(overflow)?)
        } else {
            (after_scales, after_scales)
        };
        let residual_len =
            (shape.tokens - nq).checked_mul(row).ok_or_else(overflow)?.checked_mul(es).ok_or_else(overflow)?;
        let total = residual_off.checked_add(residual_len).ok_or_else(overflow)?;
        if total > isize::MAX as usize {
            return Err(overflow());
        }
        Ok(Layout {
            nq,
            ngroups,
            codes_off,
            codes_len,
            scales_off,
            mins_off,
            meta_len,
            residual_off,
            residual_len,
            total,
        })
    }
}

/// Total blob size (header included) for the given configuration.
pub fn packed_nbytes(cfg: &Config, dtype: DType, shape: &Shape) -> Result<usize> {
    Ok(Layout::new(cfg, dtype, shape)?.total)
}

/// A parsed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub cfg: Config,
    pub dtype: DType,
    pub shape: Shape,
    pub total: usize,
}

fn rd_u16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn rd_u32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn rd_u64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

impl Header {
    pub fn new(cfg: Config, dtype: DType, shape: Shape) -> Result<Header> {
        let total = packed_nbytes(&cfg, dtype, &shape)?;
        Ok(Header { cfg, dtype, shape, total })
    }

    pub fn layout(&self) -> Layout {
        // Validated when the header was built or parsed.
        Layout::new(&self.cfg, self.dtype, &self.shape).expect("header was validated")
    }

    /// The 64-byte header as bytes (what `write` puts at the start of the blob).
    pub fn to_bytes(&self) -> [u8; HEADER_NBYTES] {
        let mut out = [0u8; HEADER_NBYTES];
        self.write(&mut out);
        out
    }

    /// Byte ranges of the zero padding in front of each 8-aligned section (scales, mins when
    /// asymmetric, residual); empty ranges are left out. With the header they are every byte of
    /// a blob that does not depend on the data.
    pub fn padding(&self) -> Vec<Range<usize>> {
        let lay = self.layout();
        let mut ranges =
            vec![lay.codes_off + lay.codes_len..lay.scales_off, lay.scales_off + lay.meta_len..lay.mins_off];
        if self.cfg.asym {
            ranges.push(lay.mins_off + lay.meta_len..lay.residual_off);
        }
        ranges.retain(|r| !r.is_empty());
        ranges
    }

    /// Writes the 64-byte header (byte offsets are listed in FORMAT.md).
    pub fn write(&self, out: &mut [u8]) {
        let h = &mut out[..HEADER_NBYTES];
        h.fill(0);
        h[0..4].copy_from_slice(&MAGIC);
        h[4..6].copy_from_slice(&VERSION.to_le_bytes());
        h[6..8].copy_from_slice(&(HEADER_NBYTES as u16).to_le_bytes());
        h[8] = self.cfg.bits;
        h[9] = self.cfg.asym as u8;
        h[10] = self.cfg.axis;
        h[11] = self.dtype as u8;
        h[12..16].copy_from_slice(&(self.cfg.group_size as u32).to_le_bytes());
        h[16..20].copy_from_slice(&(self.cfg.residual_length as u32).to_le_bytes());
        h[24..32].copy_from_slice(&(self.shape.tokens as u64).to_le_bytes());
        h[32..36].copy_from_slice(&(self.shape.heads as u32).to_le_bytes());
        h[36..40].copy_from_slice(&(self.shape.head_dim as u32).to_le_bytes());
        h[40..48].copy_from_slice(&(self.total as u64).to_le_bytes());
    }

    /// Parses a header from the start of `buf` and checks that the blob fits in `buf`
    /// (`buf` may be longer, e.g. a page row). Any bytes give an error or a header, never a panic.
    pub fn parse_prefix(buf: &[u8]) -> Result<Header> {
        if buf.len() < HEADER_NBYTES {
            return Err(QuantError::value(format!(
                "buffer holds {} bytes, expected at least the {HEADER_NBYTES}-byte header",
                buf.len()
            )));
        }
        if buf[0..4] != MAGIC {
            return Err(QuantError::value(format!("magic: expected {:?}, got {:?}", MAGIC, &buf[0..4])));
        }
        let version = rd_u16(buf, 4);
        if version != VERSION {
            return Err(QuantError::value(format!("version: expected {VERSION}, got {version}")));
        }
        let hn = rd_u16(buf, 6);
        if hn as usize != HEADER_NBYTES {
            return Err(QuantError::value(format!("header_nbytes: expected {HEADER_NBYTES}, got {hn}")));
        }
        let bits = buf[8];
        let asym = match buf[9] {
            0 => false,
            1 => true,
            v => return Err(QuantError::value(format!("asym: expected 0 or 1, got {v}"))),
        };
        let axis = buf[10];
        let dtype = DType::from_code(buf[11])
            .ok_or_else(|| QuantError::value(format!("dtype: expected 1, 2 or 3, got {}", buf[11])))?;
        if rd_u32(buf, 20) != 0 || buf[48..64].iter().any(|&b| b != 0) {
            return Err(QuantError::value("reserved: expected zero bytes"));
        }
        let tokens = rd_u64(buf, 24);
        let tokens = usize::try_from(tokens)
            .map_err(|_| QuantError::value(format!("tokens: {tokens} does not fit in memory")))?;
        let cfg = Config {
            bits,
            asym,
            axis,
            group_size: rd_u32(buf, 12) as usize,
            residual_length: rd_u32(buf, 16) as usize,
        };
        let shape = Shape { tokens, heads: rd_u32(buf, 32) as usize, head_dim: rd_u32(buf, 36) as usize };
        let total = Layout::new(&cfg, dtype, &shape)?.total;
        let stored = rd_u64(buf, 40);
        if stored != total as u64 {
            return Err(QuantError::value(format!(
                "total_nbytes: header says {stored}, its configuration implies {total}"
            )));
        }
        if buf.len() < total {
            return Err(QuantError::value(format!(
                "buffer holds {} bytes, the header's total_nbytes is {total}",
                buf.len()
            )));
        }
        Ok(Header { cfg, dtype, shape, total })
    }

    /// Parses a header and requires `buf` to be exactly one blob.
    pub fn parse(buf: &[u8]) -> Result<Header> {
        let h = Header::parse_prefix(buf)?;
        if buf.len() != h.total {
            return Err(QuantError::value(format!(
                "buffer holds {} bytes, expected exactly total_nbytes = {}",
                buf.len(),
                h.total
            )));
        }
        Ok(h)
    }

    /// Rejects a header written under another configuration; the message names the first field that differs.
    pub fn expect(&self, cfg: &Config, dtype: DType, shape: &Shape) -> Result<()> {
        let c = &self.cfg;
        let mismatch = |field: &str, want: String, got: String| {
            Err(QuantError::value(format!("header field {field}: expected {want}, got {got}")))
        };
        if c.bits != cfg.bits {
            return mismatch("bits", cfg.bits.to_string(), c.bits.to_string());
        }
        if c.asym != cfg.asym {
            return mismatch("asym", cfg.asym.to_string(), c.asym.to_string());
        }
        if c.axis != cfg.axis {
            return mismatch("axis", cfg.axis.to_string(), c.axis.to_string());
        }
        if c.group_size != cfg.group_size {
            return mismatch("group_size", cfg.group_size.to_string(), c.group_size.to_string());
        }
        if c.residual_length != cfg.residual_length {
            return mismatch("residual_length", cfg.residual_length.to_string(), c.residual_length.to_string());
        }
        if self.dtype != dtype {
            return mismatch("dtype", dtype.name().into(), self.dtype.name().into());
        }
        if self.shape != *shape {
            let s = |s: &Shape| format!("[{}, {}, {}]", s.tokens, s.heads, s.head_dim);
            return mismatch("shape", s(shape), s(&self.shape));
        }
        Ok(())
    }
}
