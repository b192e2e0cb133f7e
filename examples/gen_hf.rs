//! Writes a deterministic random Hugging Face Llama folder (bf16 safetensors,
//! sharded, with `model.safetensors.index.json` and `config.json`) with
//! nemo-tool's own safetensors writer: the input of `cargo xtask bench convert`.
//!
//! ```text
//! cargo run --release --example gen_hf -- --out hf_dir [--layers 22] [--shard-gb 1]
//! ```
//! Default shape: TinyLlama-1.1B (hidden 2048, ffn 5632, 32 heads, 4 KV heads,
//! vocab 32000, 22 layers, untied): 2.2 GB of bf16.

use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use nemo_tool::formats::safetensors::{self, WriteTensor};
use nemo_tool::formats::torch::Dtype;
use nemo_tool::io::bytes::ByteView;
use nemo_tool::io::piece::Piece;

fn random_bf16(n: u64, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(n as usize * 2);
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let v = ((x >> 11) as f64 / (1u64 << 53) as f64 - 0.5) * 0.1;
        out.extend_from_slice(&half::bf16::from_f64(v).to_le_bytes());
    }
    out
}

fn main() -> anyhow::Result<()> {
    let (mut out, mut layers, mut shard_gb) = (None, 22u64, 1.0f64);
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = it
            .next()
            .ok_or_else(|| anyhow::anyhow!("{a} needs a value"))?;
        match a.as_str() {
            "--out" => out = Some(PathBuf::from(v)),
            "--layers" => layers = v.parse()?,
            "--shard-gb" => shard_gb = v.parse()?,
            other => anyhow::bail!("unknown argument {other}"),
        }
    }
    let out = out.ok_or_else(|| anyhow::anyhow!("--out DIR is required"))?;
    let (h, f, heads, kv, vocab) = (2048u64, 5632u64, 32u64, 4u64, 32000u64);
    let d = h / heads;
    let mut shapes: Vec<(String, Vec<u64>)> =
        vec![("model.embed_tokens.weight".into(), vec![vocab, h])];
    for l in 0..layers {
        let p = |s: &str| format!("model.layers.{l}.{s}");
        shapes.extend([
            (p("input_layernorm.weight"), vec![h]),
            (p("self_attn.q_proj.weight"), vec![heads * d, h]),
            (p("self_attn.k_proj.weight"), vec![kv * d, h]),
            (p("self_attn.v_proj.weight"), vec![kv * d, h]),
            (p("self_attn.o_proj.weight"), vec![h, heads * d]),
            (p("post_attention_layernorm.weight"), vec![h]),
            (p("mlp.gate_proj.weight"), vec![f, h]),
            (p("mlp.up_proj.weight"), vec![f, h]),
            (p("mlp.down_proj.weight"), vec![h, f]),
        ]);
    }
    shapes.push(("model.norm.weight".into(), vec![h]));
    shapes.push(("lm_head.weight".into(), vec![vocab, h]));
    // Headers need sizes only: plan with zero placeholders, fill per file.
    let placeholders: Vec<WriteTensor> = shapes
        .iter()
        .map(|(n, s)| WriteTensor {
            name: n.clone(),
            dtype: Dtype::BF16,
            shape: s.clone(),
            pieces: vec![Piece::Zeros(s.iter().product::<u64>() * 2)],
        })
        .collect();
    let plan = safetensors::plan_shards(&placeholders, (shard_gb * 1e9) as u64);
    std::fs::create_dir_all(&out)?;
    let mut md = BTreeMap::new();
    md.insert("format".to_string(), "pt".to_string());
    for (file, idx) in &plan.files {
        let tensors: Vec<WriteTensor> = idx
            .iter()
            .map(|&i| {
                let t = &placeholders[i];
                let n: u64 = t.shape.iter().product();
                WriteTensor {
                    pieces: vec![Piece::Bytes(ByteView::from_vec(random_bf16(
                        n,
                        i as u64 + 1,
                    )))],
                    ..t.clone()
                }
            })
            .collect();
        let mut w = BufWriter::new(std::fs::File::create(out.join(file))?);
        safetensors::write(&mut w, file, &tensors, &md)?;
        w.flush()?;
    }
    if plan.files.len() > 1 {
        std::fs::write(
            out.join(safetensors::INDEX_FILE),
            safetensors::index_json(&placeholders, &plan),
        )?;
    }
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": h, "intermediate_size": f, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": false, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    });
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    let total: u64 = placeholders.iter().map(WriteTensor::nbytes).sum();
    println!(
        "{} tensors, {total} bytes in {} files",
        placeholders.len(),
        plan.files.len()
    );
    Ok(())
}
