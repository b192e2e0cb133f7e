//! Which globals a pickle may name ([`Policy`]): torch's `weights_only`
//! allowlist plus caller extensions. Nothing is ever imported or called; the
//! policy only decides which class/function *names* are acceptable as data.

/// Which globals a pickle may name. Nothing is ever imported or called; the
/// policy only decides which class/function *names* are acceptable in data.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    torch: bool,
    prefixes: Vec<String>,
    exact: Vec<(String, String)>,
}

/// Modules never allowed, whatever the caller adds (torch blocks the same).
const BLOCKED_MODULES: &[&str] = &["os", "sys", "posix", "nt", "subprocess", "shutil", "socket"];
/// `builtins` names never allowed.
const BLOCKED_BUILTINS: &[&str] = &[
    "eval",
    "exec",
    "compile",
    "open",
    "getattr",
    "setattr",
    "delattr",
    "__import__",
    "globals",
    "locals",
    "vars",
    "input",
    "breakpoint",
];

/// `torch.<dtype>` globals torch 2.x allows (`_get_allowed_globals`).
const TORCH_DTYPES: &[&str] = &[
    "float32",
    "float",
    "float64",
    "double",
    "float16",
    "half",
    "bfloat16",
    "complex32",
    "chalf",
    "complex64",
    "cfloat",
    "complex128",
    "cdouble",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "int8",
    "int16",
    "short",
    "int32",
    "int",
    "int64",
    "long",
    "bool",
    "qint8",
    "quint8",
    "qint32",
    "quint4x2",
    "quint2x4",
    "bits1x8",
    "bits2x4",
    "bits4x2",
    "bits8",
    "bits16",
    "float8_e4m3fn",
    "float8_e5m2",
    "float8_e4m3fnuz",
    "float8_e5m2fnuz",
    "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "uint1",
    "uint2",
    "uint3",
    "uint4",
    "uint5",
    "uint6",
    "uint7",
    "int1",
    "int2",
    "int3",
    "int4",
    "int5",
    "int6",
    "int7",
];

const TORCH_REBUILDS: &[&str] = &[
    "_rebuild_tensor",
    "_rebuild_tensor_v2",
    "_rebuild_tensor_v3",
    "_rebuild_parameter",
    "_rebuild_parameter_with_state",
    "_rebuild_qtensor",
    "_rebuild_sparse_tensor",
    "_rebuild_nested_tensor",
    "_rebuild_meta_tensor_no_storage",
    "_rebuild_wrapper_subclass",
    "_rebuild_device_tensor_from_cpu_tensor",
    "_rebuild_device_tensor_from_numpy",
];

const QSCHEMES: &[&str] = &[
    "per_tensor_affine",
    "per_channel_affine",
    "per_tensor_symmetric",
    "per_channel_symmetric",
    "per_channel_affine_float_qparams",
];

impl Policy {
    /// Allows nothing; extend with [`Policy::allow_module_prefix`] / [`Policy::allow_global`].
    pub fn empty() -> Policy {
        Policy::default()
    }

    /// torch's `weights_only=True` allowlist (torch-formats.md §2.1), plus
    /// `_io.BytesIO` (TE < 2 `_extra_state`, kept as data) and `builtins.bytes`
    /// (how protocol 2 spells `b""`).
    pub fn torch() -> Policy {
        Policy {
            torch: true,
            ..Policy::default()
        }
    }

    /// Also allow every global whose module is `prefix` without its trailing
    /// dot, or starts with `prefix` (e.g. `"torch.distributed.checkpoint."`).
    pub fn allow_module_prefix(mut self, prefix: impl Into<String>) -> Policy {
        self.prefixes.push(prefix.into());
        self
    }

    /// Also allow one exact global.
    pub fn allow_global(mut self, module: impl Into<String>, name: impl Into<String>) -> Policy {
        self.exact.push((module.into(), name.into()));
        self
    }

    /// Whether `module.name` is acceptable (module already mapped from Python 2 spelling).
    pub fn allows(&self, module: &str, name: &str) -> bool {
        let top = module.split('.').next().unwrap_or(module);
        if BLOCKED_MODULES.contains(&top) {
            return false;
        }
        if module == "builtins" && BLOCKED_BUILTINS.contains(&name) {
            return false;
        }
        if self.exact.iter().any(|(m, n)| m == module && n == name) {
            return true;
        }
        let dotted = format!("{module}.");
        if self
            .prefixes
            .iter()
            .any(|p| dotted.starts_with(p.as_str()) || module == p.as_str())
        {
            return true;
        }
        self.torch && torch_allows(module, name)
    }
}

fn torch_allows(module: &str, name: &str) -> bool {
    let storage_or_tensor = |n: &str| {
        (n.ends_with("Storage") || n.ends_with("Tensor"))
            && n.chars().all(|c| c.is_ascii_alphanumeric())
    };
    match module {
        "collections" => matches!(name, "OrderedDict" | "Counter"),
        "torch" => {
            TORCH_DTYPES.contains(&name)
                || QSCHEMES.contains(&name)
                || matches!(name, "Size" | "device" | "Tensor")
                || storage_or_tensor(name)
        }
        "torch.cuda" | "torch.sparse" => storage_or_tensor(name),
        "torch.storage" => matches!(name, "TypedStorage" | "UntypedStorage"),
        "torch._utils" => TORCH_REBUILDS.contains(&name),
        "torch._tensor" => name == "_rebuild_from_type_v2",
        "torch.nn.parameter" => name == "Parameter",
        "torch.serialization" => name == "_get_layout",
        "_codecs" => name == "encode",
        "builtins" => matches!(name, "set" | "bytearray" | "complex" | "bytes"),
        "_io" => name == "BytesIO",
        _ => false,
    }
}

/// Python 2 module spellings that protocol <= 2 pickles use.
pub(crate) fn map_module(module: &str) -> &str {
    match module {
        "__builtin__" => "builtins",
        "copy_reg" => "copyreg",
        "cStringIO" | "StringIO" => "io",
        other => other,
    }
}
