"""LoRA (peft) on a Llama: the checkpoint resumes training exactly (the frozen base, the adapters and their AdamW
state, bitwise, into a PeftModel built on another base), its folder does not pretend to be the base (no config.json:
PEFT's adapter config and the base's config under their own names), and ``export-hf --merge-lora`` writes the
folder ``from_pretrained`` loads: the base's names, the adapters merged exactly as PEFT's ``merge_and_unload``
merges them, logits equal to the trained PeftModel's."""

from __future__ import annotations

import json

import pytest
import torch
from test_model_wrappers import canonical_state, differences, manager

pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _peft_llama(seed):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from wsd_pretrain import WSDSchedule, WSDScheduler

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(seed)
    base = LlamaForCausalLM(cfg)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    sched = WSDScheduler(opt, WSDSchedule(total=8, warmup=2, decay_length=2))
    return model, opt, sched, cfg


def _step(model, opt, sched, i):
    g = torch.Generator().manual_seed(i)
    tokens = torch.randint(0, 64, (2, 10), generator=g)
    opt.zero_grad(set_to_none=True)
    model(input_ids=tokens, labels=tokens).loss.backward()
    opt.step()
    sched.step()


def test_lora_resumes_exactly_and_exports_merged(tmp_path):
    from test_model_wrappers import model_folder_names
    from transformers import LlamaForCausalLM

    from wsd_pretrain import CheckpointError
    from wsd_pretrain.checkpoint.tools import export_hf, verify_checkpoint_files
    from wsd_pretrain.cli import main

    model, opt, sched, cfg = _peft_llama(0)
    mgr = manager(tmp_path / "run", model, opt, sched, hf_config=cfg.to_dict())
    for i in range(3):
        _step(model, opt, sched, i)
    ckpt = mgr.save(["periodic"])
    saved = canonical_state(model, opt)
    mgr.close()

    # the folder: every tensor once, under PEFT's names; no config.json that would load it as the base
    assert verify_checkpoint_files(ckpt) == []
    names = model_folder_names(ckpt)
    assert sorted(names) == sorted(n for n, _ in model.named_parameters()) and len(names) == len(set(names))
    assert not (ckpt / "config.json").exists()
    adapter = json.loads((ckpt / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["peft_type"] == "LORA" and adapter["target_modules"] == ["q_proj", "v_proj"]
    assert json.loads((ckpt / "base_config.json").read_text())["model_type"] == "llama"
    with pytest.raises(CheckpointError, match="--merge-lora"):
        export_hf(ckpt, tmp_path / "plain")

    # its own job resumes it: another base (seed 1), the same adapters' layout
    model2, opt2, sched2, _ = _peft_llama(1)
    mgr2 = manager(tmp_path / "run", model2, opt2, sched2, hf_config=cfg.to_dict())
    mgr2.resume(ckpt.name)
    assert differences(saved, canonical_state(model2, opt2)) == []
    _step(model, opt, sched, 3)
    _step(model2, opt2, sched2, 3)
    assert differences(canonical_state(model, opt), canonical_state(model2, opt2)) == []
    mgr2.close()

    # the merged folder loads with from_pretrained; its logits are the trained PeftModel's at the checkpoint
    out = tmp_path / "merged"
    assert main(["ckpt", "export-hf", str(ckpt), str(out), "--merge-lora"]) == 0
    loaded = LlamaForCausalLM.from_pretrained(out)
    trained, topt, tsched, _ = _peft_llama(2)
    mgr3 = manager(tmp_path / "run", trained, topt, tsched)
    mgr3.load(ckpt)
    mgr3.close()
    tokens = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        want = trained(input_ids=tokens).logits
        got = loaded(input_ids=tokens).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    q = "model.layers.0.self_attn.q_proj"
    base_q = trained.get_submodule(f"base_model.model.{q}.base_layer").weight
    assert not torch.equal(loaded.get_submodule(q).weight, base_q)  # the adapters trained, and were merged in
    reference = trained.merge_and_unload().state_dict()  # PEFT's own merge: the same tensors, bitwise
    mine = loaded.state_dict()
    assert sorted(mine) == sorted(reference)
    assert [k for k in mine if not torch.equal(mine[k], reference[k])] == []
