//! Tensor element types and their names in every format we read or write:
//! torch storage classes (`FloatStorage`), torch dtype globals (`torch.bfloat16`),
//! safetensors (`BF16`) and zarr (`<f4`, mcore's literal `bfloat16`).

use std::fmt;

/// An element type.
#[allow(missing_docs)]
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
    U16,
    U32,
    U64,
    C64,
    C128,
    F8E4M3FN,
    F8E5M2,
    F8E4M3FNUZ,
    F8E5M2FNUZ,
}

/// (dtype, torch dtype name, legacy storage class, safetensors name, zarr typestr)
/// One row of [`TABLE`].
type Row = (
    Dtype,
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
    Option<&'static str>,
);

const TABLE: &[Row] = &[
    (
        Dtype::F64,
        "float64",
        Some("DoubleStorage"),
        Some("F64"),
        Some("<f8"),
    ),
    (
        Dtype::F32,
        "float32",
        Some("FloatStorage"),
        Some("F32"),
        Some("<f4"),
    ),
    (
        Dtype::F16,
        "float16",
        Some("HalfStorage"),
        Some("F16"),
        Some("<f2"),
    ),
    (
        Dtype::BF16,
        "bfloat16",
        Some("BFloat16Storage"),
        Some("BF16"),
        Some("bfloat16"),
    ),
    (
        Dtype::I64,
        "int64",
        Some("LongStorage"),
        Some("I64"),
        Some("<i8"),
    ),
    (
        Dtype::I32,
        "int32",
        Some("IntStorage"),
        Some("I32"),
        Some("<i4"),
    ),
    (
        Dtype::I16,
        "int16",
        Some("ShortStorage"),
        Some("I16"),
        Some("<i2"),
    ),
    (
        Dtype::I8,
        "int8",
        Some("CharStorage"),
        Some("I8"),
        Some("|i1"),
    ),
    (
        Dtype::U8,
        "uint8",
        Some("ByteStorage"),
        Some("U8"),
        Some("|u1"),
    ),
    (
        Dtype::Bool,
        "bool",
        Some("BoolStorage"),
        Some("BOOL"),
        Some("|b1"),
    ),
    (Dtype::U16, "uint16", None, Some("U16"), Some("<u2")),
    (Dtype::U32, "uint32", None, Some("U32"), Some("<u4")),
    (Dtype::U64, "uint64", None, Some("U64"), Some("<u8")),
    (
        Dtype::C64,
        "complex64",
        Some("ComplexFloatStorage"),
        None,
        Some("<c8"),
    ),
    (
        Dtype::C128,
        "complex128",
        Some("ComplexDoubleStorage"),
        None,
        Some("<c16"),
    ),
    (
        Dtype::F8E4M3FN,
        "float8_e4m3fn",
        None,
        Some("F8_E4M3"),
        None,
    ),
    (Dtype::F8E5M2, "float8_e5m2", None, Some("F8_E5M2"), None),
    (Dtype::F8E4M3FNUZ, "float8_e4m3fnuz", None, None, None),
    (Dtype::F8E5M2FNUZ, "float8_e5m2fnuz", None, None, None),
];

impl Dtype {
    fn row(
        self,
    ) -> &'static (
        Dtype,
        &'static str,
        Option<&'static str>,
        Option<&'static str>,
        Option<&'static str>,
    ) {
        TABLE
            .iter()
            .find(|r| r.0 == self)
            .expect("every Dtype has a TABLE row")
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::F64 | Dtype::I64 | Dtype::U64 | Dtype::C64 => 8,
            Dtype::C128 => 16,
            Dtype::F32 | Dtype::I32 | Dtype::U32 => 4,
            Dtype::F16 | Dtype::BF16 | Dtype::I16 | Dtype::U16 => 2,
            Dtype::I8 | Dtype::U8 | Dtype::Bool => 1,
            Dtype::F8E4M3FN | Dtype::F8E5M2 | Dtype::F8E4M3FNUZ | Dtype::F8E5M2FNUZ => 1,
        }
    }

    /// The torch dtype name, as in `torch.bfloat16`.
    pub fn torch_name(self) -> &'static str {
        self.row().1
    }

    /// From a torch dtype name (`bfloat16`); also accepts the aliases torch
    /// pickles (`float`, `half`, `long`, ...).
    pub fn from_torch_name(name: &str) -> Option<Dtype> {
        let canonical = match name {
            "float" => "float32",
            "double" => "float64",
            "half" => "float16",
            "long" => "int64",
            "int" => "int32",
            "short" => "int16",
            "cfloat" => "complex64",
            "cdouble" => "complex128",
            other => other,
        };
        TABLE.iter().find(|r| r.1 == canonical).map(|r| r.0)
    }

    /// The legacy storage class written by `torch.save` for `_rebuild_tensor_v2`
    /// (`None` for dtypes that need `_rebuild_tensor_v3`).
    pub fn storage_class(self) -> Option<&'static str> {
        self.row().2
    }

    /// From a legacy storage class name (`BFloat16Storage`).
    pub fn from_storage_class(name: &str) -> Option<Dtype> {
        TABLE.iter().find(|r| r.2 == Some(name)).map(|r| r.0)
    }

    /// The safetensors dtype string.
    pub fn safetensors_name(self) -> Option<&'static str> {
        self.row().3
    }

    /// From a safetensors dtype string.
    pub fn from_safetensors_name(name: &str) -> Option<Dtype> {
        TABLE.iter().find(|r| r.3 == Some(name)).map(|r| r.0)
    }

    /// The zarr v2 dtype string as megatron-core writes it.
    pub fn zarr_name(self) -> Option<&'static str> {
        self.row().4
    }

    /// From a zarr v2 dtype string (`<f4`, `|u1`, or mcore's `bfloat16`).
    pub fn from_zarr_name(name: &str) -> Option<Dtype> {
        let norm = match name {
            "|b1" | "<b1" => "|b1",
            "|i1" | "<i1" => "|i1",
            "|u1" | "<u1" => "|u1",
            other => other,
        };
        TABLE.iter().find(|r| r.4 == Some(norm)).map(|r| r.0)
    }

    /// Every dtype, in table order.
    pub fn all() -> impl Iterator<Item = Dtype> {
        TABLE.iter().map(|r| r.0)
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.torch_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in Dtype::all() {
            assert_eq!(Dtype::from_torch_name(d.torch_name()), Some(d));
            if let Some(s) = d.storage_class() {
                assert_eq!(Dtype::from_storage_class(s), Some(d));
            }
            if let Some(s) = d.safetensors_name() {
                assert_eq!(Dtype::from_safetensors_name(s), Some(d));
            }
            if let Some(s) = d.zarr_name() {
                assert_eq!(Dtype::from_zarr_name(s), Some(d));
            }
        }
        assert_eq!(Dtype::from_torch_name("half"), Some(Dtype::F16));
        assert_eq!(Dtype::from_zarr_name("bfloat16"), Some(Dtype::BF16));
    }
}
