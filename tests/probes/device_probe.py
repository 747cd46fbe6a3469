"""Run as one rank whose environment says LOCAL_RANK=1 in a task that sees one GPU: the device the rank chose and
the one DeepSpeed's engine, its parameters and the current CUDA device end up on, as one JSON line.
tests/gpu/test_gpu.py asserts on it."""

import json
import sys

from trainer.commands import fit_in_process


def main(data_root: str, run_dir: str) -> None:
    import torch

    trainer = fit_in_process("awd_ptb", [f"data.root={data_root}", "data.verify=false", "data.download=false",
                                         "model.emsize=32", "model.nhid=48", "data.bptt=20", "data.batch_size=4",
                                         "train.max_steps=2", "train.test_at_end=false", "train.progress=false"],
                             run_dir)
    print(json.dumps({"chosen": str(trainer.ctx.device), "engine": str(trainer.engine.device),
                      "parameters": sorted({str(p.device) for p in trainer.engine.module.parameters()}),
                      "current": torch.cuda.current_device() if torch.cuda.is_available() else None, "steps": trainer.state.step}))


if __name__ == "__main__":
    main(*sys.argv[1:])
