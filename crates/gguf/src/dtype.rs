//! `GgmlDType`: the ggml/GGUF tensor element types, their ids and block geometry.

use std::fmt;

/// The tensor element types of ggml/GGUF, with their on-disk ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)]
pub enum GgmlDType {
    /// 32-bit float, id 0: norms and small tensors.
    F32,
    /// IEEE half float, id 1.
    F16,
    /// 4-bit, id 2: blocks of 32 with one f16 scale (18 bytes).
    Q4_0,
    /// 4-bit, id 3: blocks of 32 with an f16 scale and minimum (20 bytes).
    Q4_1,
    /// 5-bit, id 6: blocks of 32 with one f16 scale (22 bytes).
    Q5_0,
    /// 5-bit, id 7: blocks of 32 with an f16 scale and minimum (24 bytes).
    Q5_1,
    /// 8-bit, id 8: blocks of 32 with one f16 scale (34 bytes).
    Q8_0,
    /// 8-bit, id 9: blocks of 32 with an f16 scale and an f16 scaled sum (36 bytes); ggml's
    /// intermediate format for activations.
    Q8_1,
    /// 2-bit k-quant, id 10: super-blocks of 256 (84 bytes).
    Q2_K,
    /// 3-bit k-quant, id 11: super-blocks of 256 (110 bytes).
    Q3_K,
    /// 4-bit k-quant, id 12: super-blocks of 256 with 6-bit sub-block scales (144 bytes);
    /// the bulk of a Q4_K_M file such as the default model.
    Q4_K,
    /// 5-bit k-quant, id 13: super-blocks of 256 (176 bytes).
    Q5_K,
    /// 6-bit k-quant, id 14: super-blocks of 256 (210 bytes).
    Q6_K,
    /// 8-bit k-quant, id 15: super-blocks of 256 with an f32 scale (292 bytes); ggml's
    /// intermediate format for activations in k-quant dot products.
    Q8_K,
    /// bfloat16, id 30.
    BF16,
}

impl GgmlDType {
    /// Maps a GGUF tensor type id to a type; `None` for ids we do not know at all.
    pub fn from_u32(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            9 => Self::Q8_1,
            10 => Self::Q2_K,
            11 => Self::Q3_K,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            15 => Self::Q8_K,
            30 => Self::BF16,
            _ => return None,
        })
    }

    /// The GGUF id of this type.
    pub fn to_u32(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q8_1 => 9,
            Self::Q2_K => 10,
            Self::Q3_K => 11,
            Self::Q4_K => 12,
            Self::Q5_K => 13,
            Self::Q6_K => 14,
            Self::Q8_K => 15,
            Self::BF16 => 30,
        }
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 | Self::Q8_1 => 32,
            Self::Q2_K | Self::Q3_K | Self::Q4_K | Self::Q5_K | Self::Q6_K | Self::Q8_K => 256,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q8_1 => 36,
            Self::Q2_K => 84,
            Self::Q3_K => 110,
            Self::Q4_K => 144,
            Self::Q5_K => 176,
            Self::Q6_K => 210,
            Self::Q8_K => 292,
        }
    }

    /// Bytes taken by `n` elements (which must be a whole number of blocks).
    pub fn bytes_for(self, n: usize) -> Option<usize> {
        if !n.is_multiple_of(self.block_size()) {
            return None;
        }
        (n / self.block_size()).checked_mul(self.type_size())
    }
}

impl fmt::Display for GgmlDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}
