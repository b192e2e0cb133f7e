//! Observability outputs for the Python checks: a TensorBoard event file
//! (read by tensorboard's own reader in `tests/interop/test_obs.py`).

use nemo_tool::distill::obs::tensorboard::EventWriter;

/// Writes `$NEMO_TOOL_INTEROP_OUT/tensorboard/events.*` with known scalars.
#[test]
fn write_tensorboard_interop_file() {
    let Some(dir) = std::env::var_os("NEMO_TOOL_INTEROP_OUT") else {
        return;
    };
    let dir = std::path::Path::new(&dir).join("tensorboard");
    let _ = std::fs::remove_dir_all(&dir);
    let mut w = EventWriter::create(&dir).unwrap();
    for step in 0..20 {
        w.scalar("train/kd_loss", 10.0 / (1.0 + step as f32), step)
            .unwrap();
        if step % 5 == 0 {
            w.scalar("val/kd_loss", 11.0 / (1.0 + step as f32), step)
                .unwrap();
        }
    }
    w.flush().unwrap();
}
