"""A Hugging Face ``Trainer`` run with WSD checkpoints: a tiny Llama on random tokens, on CPU in seconds.

    python docs/examples/hf_trainer.py --run-dir runs/hf_example      # run it again: it resumes
    torchrun --nproc-per-node 2 docs/examples/hf_trainer.py --run-dir runs/hf_example_ddp

Every checkpoint under runs/hf_example/checkpoints/ is a model folder (``LlamaForCausalLM.from_pretrained``) with
the full training state beside it; an interrupted run resumes exactly where it stopped, data position included.
"""

from __future__ import annotations

import argparse
import logging

import torch
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from wsd_pretrain import CheckpointConfig
from wsd_pretrain.integrations.hf import WSDTrainerCallback, last_checkpoint, wsd_scheduler


class RandomTokens(Dataset):
    """Fixed random sequences: a stand-in for a tokenized corpus."""

    def __init__(self, n: int, length: int, vocab: int) -> None:
        self.data = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(1234))

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.data[i], "labels": self.data[i]}


def training_args(output_dir: str, steps: int) -> TrainingArguments:
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,  # the schedule's total: WSDTrainerCallback refuses a mismatch
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        warmup_steps=3,
        save_strategy="no",  # our checkpoints are all a resume needs
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=0.1,  # the RNG matters: a resume restores it
    )
    return LlamaForCausalLM(config)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", default="runs/hf_example")
    p.add_argument("--steps", type=int, default=24, help="optimizer updates (the schedule's total)")
    p.add_argument("--every-steps", type=int, default=None, help="also save every N updates")
    args_cli = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    args = training_args(args_cli.run_dir, args_cli.steps)
    model = tiny_llama(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    scheduler = wsd_scheduler(optimizer, args, decay_fraction=0.25)  # total = max_steps, warmup = warmup_steps
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=RandomTokens(40, 16, model.config.vocab_size),
        optimizers=(optimizer, scheduler),
        callbacks=[WSDTrainerCallback(config=CheckpointConfig(every_steps=args_cli.every_steps))],
    )
    trainer.train(resume_from_checkpoint=last_checkpoint(args.output_dir))  # None on a fresh run


if __name__ == "__main__":
    main()
