"""Run by tests/test_distributed.py under torchrun (2 processes, gloo, CPU): one optimizer step's
gradients through hfgpu.train.window_backward, written by rank 0 for comparison with a single-process
full-batch reference. Usage: torchrun --nproc_per_node 2 tests/ddp_grad_check.py MODEL_DIR BATCH.pt OUT.pt [OBJECTIVE]
(OBJECTIVE: sft, the default, on rows of input_ids/labels; or a preference objective on pairs (4, 2, tokens))."""

import sys

import torch
from accelerate import Accelerator

from hfgpu.modeling import ModelSettings, prepare_model
from hfgpu.train import LoopConfig, window_backward


def loop_config(objective: str = "sft") -> LoopConfig:
    from hfgpu.preference import Objective

    return LoopConfig.bare(1, 2, 1, objective=Objective(objective), loss_chunk=5 if objective != "sft" else None)


def main(model_dir: str, batch_path: str, out_path: str, objective: str = "sft") -> None:
    acc = Accelerator(cpu=True)
    model = prepare_model(model_dir, ModelSettings(strategy="full", precision="fp32"), seed=0)
    model = acc.prepare(model)
    model.train()
    rows = torch.load(batch_path)  # input_ids, labels, attention_mask: (4, s); pairs: (4, 2, s) and ref_logps (4, 2)
    mine = range(acc.process_index * 2, acc.process_index * 2 + 2)  # rank 0: rows 0, 1; rank 1: rows 2, 3
    window = [{k: v[i : i + 1] for k, v in rows.items()} for i in mine]
    loss = window_backward(acc, model, window, 1, loop_config(objective))
    if acc.is_main_process:
        grads = {n: p.grad.detach().clone() for n, p in acc.unwrap_model(model).named_parameters() if p.grad is not None}
        torch.save({"loss": loss.item(), "grads": grads}, out_path)
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:5])
