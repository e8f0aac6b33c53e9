"""The demo's routing step: capture what the stage-3 toy model's experts do on a few samples and draw the
figures of `moellava.vis.plot` into `demo_output/vis/` (the same code as the two commands it prints)."""

import contextlib
import os
import sys
from typing import List


def plot_routing(model_dir: str, data_path: str, image_folder: str, out_dir: str, limit: int = 48) -> List[str]:
    """Regenerate the last answer of the first `limit` samples of `data_path` with the model at `model_dir`,
    recording the routing into `out_dir`/routing.{json,safetensors}; returns the figure paths."""
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's loggers print on stdout when imported
        from moellava.model.builder import load_pretrained_model
        from moellava.vis import capture, plot

        tokenizer, model, processor, _ = load_pretrained_model(model_dir)
        image_processor = processor["image"]
    routing = os.path.join(out_dir, "routing")
    argv = ["--model-path", model_dir, "--data", data_path, "--image-folder", image_folder, "--output", routing,
            "--limit", str(limit), "--max-new-tokens", "12"]
    print(f"\n+ python -m moellava.vis.capture {' '.join(argv)}", flush=True)
    print(f"+ python -m moellava.vis.plot {routing} --out {out_dir}", flush=True)
    recorder = capture.capture_dataset(model, tokenizer, image_processor, capture.parse_args(argv))
    recorder.save(routing)
    figures = plot.plot_records(recorder.records, out_dir)
    tokens = sum(len(sample) for sample in recorder.records.samples)
    print(f"  routed {tokens} tokens of {len(recorder.records)} samples; figures "
          f"{', '.join(sorted({os.path.basename(path) for path in figures}))} in {out_dir}", flush=True)
    return figures
