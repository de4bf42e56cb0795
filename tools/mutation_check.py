"""Do the tests catch the bugs they are there for? Each entry of MUTATIONS is one small, plausible bug; it is put into
a copy of the repository (never the working tree) and the tests that should catch it run against that copy.

    python tools/mutation_check.py                         # every mutation; exit 1 if any is missed
    python tools/mutation_check.py --only rng-restore-noop,retention-newest-not-kept
    python tools/mutation_check.py --list                  # the mutations, without running anything
    python tools/mutation_check.py --markdown docs/testing.md   # also rewrite the table in docs/testing.md

Each mutation replaces an exact piece of text (it must occur exactly once in its file: when the code moves, the
check stops with the entries to update instead of testing nothing). The copy comes first on ``sys.path`` and on
``PYTHONPATH``, so the tests, their helpers, spawned ranks, ``torchrun`` workers and the ``wsd-pretrain`` command
all import the mutated code. Each selection runs with ``pytest -x``; a mutation is *caught* when a test fails, *missed*
when all pass. Before the mutations, the same selections run on an unmutated copy and must pass (``--no-baseline``
skips that), so that a failure is the mutation's doing.

Adding a mutation (do it for every bug found): one ``Mutation`` entry, six fields: id, file, the exact old text,
the new text, the tests that must catch it, and what it breaks.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPY_IGNORE = (
    ".git",
    ".venv",
    ".cache",
    "runs",
    "__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
)
TABLE_START, TABLE_END = "<!-- mutation-table -->", "<!-- /mutation-table -->"


@dataclass(frozen=True)
class Mutation:
    id: str
    file: str
    """Path relative to the repository root."""
    old: str
    """Exact text to replace; it must occur exactly once in the file."""
    new: str
    tests: tuple[str, ...]
    """pytest arguments (files or node ids) that must fail with the mutation in place."""
    breaks: str
    """What a user would see go wrong."""


M = Mutation
T_SCHEDULE = "tests/test_schedule.py"
T_RESUME_DDP = "tests/test_checkpoint_resume.py::test_stop_and_resume_equals_straight[ddp]"
T_MANAGER = "tests/test_checkpoint_manager.py"
T_FAULTS = "tests/test_checkpoint_faults.py"
T_AGREEMENT = "tests/test_checkpoint_agreement.py"
T_DSPIPE = "tests/test_deepspeed_pipe.py::test_pipe_pp2_zero1_save_verify_resume_bitwise_and_on_one_stage"
T_DSPIPE_MAIN = "tests/test_train_3d.py::test_deepspeed_pipeline_config_saves_is_killed_and_resumes_exactly"
T_AUTOTP = (
    "tests/test_autotp.py::test_autotp_is_refused_at_build_and_its_deepspeed_checkpoint_imports_as_deepspeed_merges_it"
)
T_TP_FSDP2 = "tests/test_tensor_parallel.py::test_fsdp2_tp_resumes_bitwise_and_loads_into_every_layout_as_dcp_does"
T_RANGES = "tests/test_range_writes.py::test_ddp_replicated_weights_are_written_a_range_per_rank_and_resumed_reading_each_byte_once"

T_PIPELINE = "tests/test_pipeline.py::test_pipeline_stages_save_as_one_model_and_resume_on_any_layout"

MUTATIONS: list[Mutation] = [
    # ------------------------------------------------------------------ shapes and the schedule
    M(
        "warmup-1sqrt-other-curve",
        "wsd_pretrain/shapes.py",
        "return 1.0 - math.sqrt(1.0 - t)",
        "return t ** (math.log(1 - math.sqrt(0.5)) / math.log(0.5))",
        (f"{T_SCHEDULE}::test_warmup_shapes", f"{T_SCHEDULE}::test_warmup_shapes_where_the_candidate_formulas_differ"),
        "the 1-sqrt warmup becomes a power curve that agrees with 1 - sqrt(1 - t) only at t = 0, 0.5 and 1",
    ),
    M(
        "decay-1sqrt-squared",
        "wsd_pretrain/shapes.py",
        "return floor + (1.0 - floor) * (1.0 - math.sqrt(t))",
        "return floor + (1.0 - floor) * (1.0 - t * t)",
        (f"{T_SCHEDULE}::test_decay_shapes_endpoints_and_midpoint",),
        "the default 1-sqrt decay becomes 1 - t^2",
    ),
    M(
        "decay-inverse-sign",
        "wsd_pretrain/shapes.py",
        "return 1.0 / (t * (1.0 / floor) + (1.0 - t))",
        "return 1.0 / (t * (1.0 / floor) + (1.0 + t))",
        (f"{T_SCHEDULE}::test_inverse_shape_is_the_papers_formula",),
        "the inverse-proportional decay is not Wen et al.'s formula",
    ),
    M(
        "schedule-progress-convention",
        "wsd_pretrain/schedule.py",
        't = (position - seg.phase_start + (1 if self.progress == "end" else 0)) / seg.phase_length',
        't = (position - seg.phase_start + (1 if self.progress == "start" else 0)) / seg.phase_length',
        (f"{T_SCHEDULE}::test_exact_factors_every_step_end_convention",),
        "the LR is read at the other end of each update (every warmup and decay value off by one update)",
    ),
    M(
        "schedule-fraction-rounding",
        "wsd_pretrain/schedule.py",
        "d = math.floor(period * fraction + _EPS)",
        "d = math.floor(period * fraction)",
        (f"{T_SCHEDULE}::test_decay_length_per_milestone_and_fraction_rounding",),
        "decay_fraction=0.29 of 100 steps gives a 28-step decay (floating-point rounding)",
    ),
    M(
        "schedule-geometric-halved",
        "wsd_pretrain/schedule.py",
        "return tuple(self.origin + (span >> (n - 1 - i)) for i in range(n))",
        "return tuple(self.origin + (span >> (n - i)) for i in range(n))",
        (f"{T_SCHEDULE}::test_geometric_milestones_end_at_the_total_as_the_seed_documents",),
        "geometric milestones end at half the run instead of the total",
    ),
    M(
        "schedule-branch-axis",
        "wsd_pretrain/schedule.py",
        "            if rewind:\n                shift += d",
        "            if rewind:\n                shift += 0",
        (f"{T_SCHEDULE}::test_branching_rewinds_and_positions",),
        "branching mode does not count the branches' updates: positions repeat, LR no longer a function of them",
    ),
    M(
        "schedule-events-twice",
        "wsd_pretrain/schedule.py",
        "lo = bisect_right(self._event_positions, previous)",
        "lo = bisect_left(self._event_positions, previous)",
        (f"{T_SCHEDULE}::test_events_between_for_steps_and_for_tokens",),
        "a pre-decay or post-decay point is reported again on the update after it (saved twice)",
    ),
    M(
        "schedule-trajectory-late",
        "wsd_pretrain/schedule.py",
        "if ms.rewind and ms.post_decay <= position:",
        "if ms.rewind and ms.post_decay < position:",
        (f"{T_SCHEDULE}::test_branching_rewinds_and_positions",),
        "right after a branch, the trajectory position still counts the branch (data and continuations off)",
    ),
    # ------------------------------------------------------------------ the torch scheduler and DeepSpeed glue
    M(
        "scheduler-resume-previous-position",
        "wsd_pretrain/scheduler.py",
        'self.position = state["position"]',
        'self.position = state["previous_position"]',
        ("tests/test_scheduler.py::test_save_reload_continue_gives_the_identical_sequence",),
        "a resumed scheduler replays one update's LR",
    ),
    M(
        "scheduler-tokens-as-steps",
        "wsd_pretrain/scheduler.py",
        "            self.position += increment\n",
        "            self.position += 1\n",
        ("tests/test_scheduler.py::test_token_based_schedule",),
        "a token-based schedule advances one unit per update whatever the tokens",
    ),
    M(
        "scheduler-typeerror-escapes",
        "wsd_pretrain/scheduler.py",
        'raise WSDError(f"WSDScheduler.step failed: {exc}") from exc',
        "raise",
        ("tests/test_scheduler.py::test_a_type_error_inside_step_reaches_deepspeed_as_another_error",),
        "a TypeError inside step() reaches DeepSpeed, which calls step() again: the schedule advances twice",
    ),
    M(
        "scheduler-accepts-changed-schedule",
        "wsd_pretrain/scheduler.py",
        "        if saved == mine:\n",
        "        if True:\n",
        ("tests/test_scheduler.py::test_resume_under_another_schedule_is_refused_naming_the_change",),
        "resuming under a changed schedule silently changes the LR curve",
    ),
    M(
        "ds-config-section-kept",
        "wsd_pretrain/deepspeed_scheduler.py",
        '    del config["scheduler"]\n',
        "",
        ("tests/test_configs.py::test_deepspeed_configs_carry_a_valid_wsd_section",),
        'split_ds_config hands back the "WSD" scheduler section it should have taken out',
    ),
    M(
        "ds-scheduler-arguments-kept-in-schedule",
        "wsd_pretrain/deepspeed_scheduler.py",
        "scheduler_args = {k: params.pop(k) for k in _SCHEDULER_ARGS if k in params}",
        "scheduler_args = {k: params[k] for k in _SCHEDULER_ARGS if k in params}",
        ("tests/test_deepspeed_scheduler.py::test_a_ds_config_section_is_split_off_with_the_schedulers_own_arguments",),
        "warmup_start_lr or tokens_per_step in a ds_config WSD section makes it refused as an unknown setting",
    ),
    M(
        "compat-no-step-counter",
        "wsd_pretrain/compat.py",
        '        state["num_updates"] = self._num_updates\n',
        "",
        ("tests/test_compat.py::test_resume_continues_instead_of_restarting_warmup",),
        "the seed's bug back: a resumed compat scheduler restarts its warmup",
    ),
    M(
        "compat-continuation-flag-overwritten",
        "wsd_pretrain/compat.py",
        'keys = _SCHEDULE_KEYS if continuation else (*_SCHEDULE_KEYS, "is_continuation_from_checkpoint")',
        'keys = (*_SCHEDULE_KEYS, "is_continuation_from_checkpoint")',
        ("tests/test_compat.py::test_continuation_keeps_no_warmup_after_load_state_dict",),
        "the seed's bug back: load_state_dict turns a continuation into a fresh run (warmup returns)",
    ),
    M(
        "compat-checkpoints-documented-not-seed",
        "wsd_pretrain/compat.py",
        "    first = total_steps // 4\n",
        "    first = total_steps // 2\n",
        ("tests/test_compat.py::test_estimate_checkpoint_steps_is_the_seeds",),
        "estimate_checkpoint_steps no longer returns the seed's numbers",
    ),
    # ------------------------------------------------------------------ RNG, the manager's policy, retention
    M(
        "rng-restore-noop",
        "wsd_pretrain/checkpoint/rng.py",
        '    try:\n        py = state["python"]',
        '    return\n    try:\n        py = state["python"]',
        (T_RESUME_DDP,),
        "resume keeps fresh random streams: dropout masks and data augmentation differ from the uninterrupted run",
    ),
    M(
        "rng-python-not-restored",
        "wsd_pretrain/checkpoint/rng.py",
        '        random.setstate((py["version"], tuple(py["state"]), py["gauss_next"]))\n',
        "        del py\n",
        (T_RESUME_DDP,),
        "python's random module is not restored on resume",
    ),
    M(
        "rng-numpy-not-restored",
        "wsd_pretrain/checkpoint/rng.py",
        '        if "numpy" in state:\n',
        '        if "numpy" in state and False:\n',
        (T_RESUME_DDP,),
        "numpy's global generator is not restored on resume",
    ),
    M(
        "rng-torch-not-captured",
        "wsd_pretrain/checkpoint/rng.py",
        'state["torch"] = _b64(torch.get_rng_state())',
        'state["torch"] = _b64(torch.Generator().get_state())',
        (T_RESUME_DDP,),
        "the checkpoint holds a fresh torch generator instead of the run's (dropout differs after resume)",
    ),
    M(
        "manager-periodic-off-by-one",
        "wsd_pretrain/checkpoint/manager.py",
        "if cfg.every_steps and s.last_epoch % cfg.every_steps == 0:",
        "if cfg.every_steps and (s.last_epoch + 1) % cfg.every_steps == 0:",
        (T_RESUME_DDP,),
        "periodic checkpoints land one update early",
    ),
    M(
        "manager-resumes-oldest",
        "wsd_pretrain/checkpoint/manager.py",
        "            for i, info in enumerate(reversed(infos)):\n",
        "            for i, info in enumerate(infos):\n",
        (T_RESUME_DDP,),
        "resume('auto') loads the oldest checkpoint, not the newest",
    ),
    M(
        "manager-no-rewind",
        "wsd_pretrain/checkpoint/manager.py",
        'if event.kind == "post-decay" and event.milestone.rewind:',
        'if event.kind == "post-decay" and event.milestone.rewind and False:',
        (f"{T_MANAGER}::test_branching_leaves_the_main_trajectory_untouched",),
        "branching mode trains on from the decayed weights instead of going back to the pre-decay state",
    ),
    M(
        "retention-newest-not-kept",
        "wsd_pretrain/checkpoint/retention.py",
        "        kept.add(len(committed) - 1)  # rule 1: the newest complete checkpoint\n",
        "        pass\n",
        ("tests/test_retention.py",),
        "with keep_last=0 retention deletes the newest complete checkpoint, the one a restart resumes from",
    ),
    M(
        "retention-keeps-one-too-many",
        "wsd_pretrain/checkpoint/retention.py",
        "rotating[max(0, len(rotating) - keep_last) :]",
        "rotating[max(0, len(rotating) - keep_last - 1) :]",
        ("tests/test_retention.py",),
        "retention keeps keep_last + 1 periodic checkpoints",
    ),
    M(
        "retention-imported-rotates",
        "wsd_pretrain/checkpoint/retention.py",
        'ALWAYS_KEPT_KINDS = frozenset({"imported"})',
        "ALWAYS_KEPT_KINDS = frozenset()",
        ("tests/test_retention.py",),
        "an imported checkpoint (the only copy of another framework's state) is deleted by rotation",
    ),
    # ------------------------------------------------------------------ object storage
    M(
        "azure-create-unconditional",
        "wsd_pretrain/checkpoint/azure_store.py",
        '        if if_none_match:\n            kwargs["match_condition"] = MatchConditions.IfMissing\n        elif',
        "        if False:\n            pass\n        elif",
        ("tests/test_azure_storage.py::test_azure_store_operations",),
        "the conditional create on Azure (If-None-Match: * on Put Blob) is dropped: a second manifest, claim or "
        "lease silently replaces the first",
    ),
    M(
        "azure-blocklist-unconditional",
        "wsd_pretrain/checkpoint/azure_store.py",
        '                    kwargs["match_condition"] = MatchConditions.IfMissing\n',
        "                    pass\n",
        ("tests/test_azure_storage.py::test_azure_store_operations",),
        "a staged upload's commit (Put Block List) on Azure drops its create-only condition and overwrites a blob",
    ),
    M(
        "s3-claim-unconditional",
        "wsd_pretrain/checkpoint/objstore.py",
        "        store.put((ckpt / CLAIM).key, body, if_none_match=True)\n        return\n",
        "        store.put((ckpt / CLAIM).key, body)\n        return\n",
        ("tests/test_object_storage.py::test_cp_list_inspect_verify_resume",),
        "two writers of one checkpoint name on S3 both write their objects over each other",
    ),
    M(
        "s3-unfinished-visible",
        "wsd_pretrain/checkpoint/objstore.py",
        "        if store.head((ckpt / F.MANIFEST).key) is None:  # the object decides",
        "        if False:  # the object decides",
        ("tests/test_object_storage.py::test_cp_list_inspect_verify_resume",),
        "an unfinished save on S3 (no manifest) is listed as a checkpoint (corrupt) instead of unfinished",
    ),
    M(
        "s3-upload-error-rank0-only",
        "wsd_pretrain/checkpoint/manager.py",
        "        self._join_retention()\n        self._agree_on_upload()\n\n    def _agree_on_upload",
        "        self._join_retention()\n\n    def _agree_on_upload",
        ("tests/test_object_storage.py::test_manager_on_s3_lease_leftovers_failures",),
        "a failed upload to S3 goes unreported: the job believes its checkpoint is on the bucket",
    ),
    M(
        "s3-direct-failed-save-left",
        "wsd_pretrain/checkpoint/save.py",
        "        remove_unfinished(objects[0], objects[1])",
        "        pass",
        ("tests/test_object_storage.py::test_manager_on_s3_direct_two_ranks",),
        "a save streamed straight to S3 that failed on one rank leaves the other ranks' objects on the bucket",
    ),
    M(
        "s3-rank-gone-bare-error",
        "wsd_pretrain/checkpoint/manager.py",
        "            except Exception as exc:  # a rank is gone (killed mid-upload)",
        "            except CheckpointError as exc:  # a rank is gone (killed mid-upload)",
        (
            "tests/test_object_storage.py::"
            "test_a_rank_killed_mid_upload_fails_the_save_on_the_other_and_the_next_run_cleans",
        ),
        "a rank killed mid-upload: the other rank raises the transport's bare error, not one naming the save",
    ),
    M(
        "s3-direct-checksum-not-streamed",
        "wsd_pretrain/checkpoint/save.py",
        "    def write(self, data: Any) -> None:\n        self.writer.write(data)",
        "    def write(self, data: Any) -> None:\n        self.writer.write(bytes(len(memoryview(data).cast('B'))))",
        ("tests/test_object_storage.py::test_manager_on_s3_direct_two_ranks",),
        "the bytes streamed to S3 are not the bytes the manifest's checksum was computed over",
    ),
    M(
        "s3-commit-without-every-rank",
        "wsd_pretrain/checkpoint/objstore_tier.py",
        '            failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e]',
        '            failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e and r == 0]',
        ("tests/test_object_storage.py::test_manager_on_s3_two_ranks",),
        "rank 0 commits a checkpoint on S3 although another rank's upload failed: a manifest over missing objects",
    ),
    M(
        "s3-rank0-uploads-all",
        "wsd_pretrain/checkpoint/objstore_tier.py",
        'if int(rec.get("rank", 0)) % world == rank)\n            problems',
        "if rank == 0)\n            problems",
        ("tests/test_object_storage.py::test_manager_on_s3_two_ranks",),
        "every object of an s3:// save goes through rank 0 again (the other ranks upload nothing)",
    ),
    M(
        "s3-fetch-share-lost",
        "wsd_pretrain/checkpoint/objread.py",
        'if not rel.endswith(".safetensors") or int(rec.get("rank", i)) % world != rank:',
        'if not rel.endswith(".safetensors") or int(rec.get("rank", i)) % world != 0:',
        ("tests/test_object_storage.py::test_manager_on_s3_two_ranks",),
        "every rank of a resume from S3 verifies rank 0's share: the other ranks' files are never checksummed",
    ),
    M(
        "s3-stall-unnamed",
        "wsd_pretrain/checkpoint/storage.py",
        "            if _timed_out(exc):\n                raise self._stalled(what, key, t0, once, exc) from None\n",
        "",
        (
            "tests/test_object_storage.py::"
            "test_a_store_that_stops_answering_fails_the_save_on_every_rank_then_the_next_commits",
        ),
        "a store that stopped answering is reported as a generic failure: the error no longer says that the store "
        "stopped answering, for how long, or within which limit",
    ),
    M(
        "s3-ranged-small-pieces",
        "wsd_pretrain/checkpoint/objread.py",
        "        piece = min(PIECE_MAX, max(PIECE, -(-total // (2 * THREADS * PIECE)) * PIECE))\n",
        "        piece = PIECE\n",
        ("tests/test_object_storage.py::test_resume_in_place_cuts_a_large_fetch_into_fewer_larger_gets",),
        "a resume reading much from the bucket cuts it into the smallest ranged GETs (many more requests)",
    ),
    M(
        "s3-model-headers-one-by-one",
        "wsd_pretrain/checkpoint/objread.py",
        "        source.headers(sorted({e.file for g in self.groups.values() for e in g.values() if e.file is not None}))\n",
        "        pass\n",
        ("tests/test_object_storage.py::test_resume_in_place_cuts_a_large_fetch_into_fewer_larger_gets",),
        "a resume from S3 reads each model shard's header with its own GET, one after another",
    ),
    M(
        "s3-state-headers-one-by-one",
        "wsd_pretrain/checkpoint/objread.py",
        "                source.headers(pending)\n",
        "                [source.header(rel) for rel in pending]\n",
        ("tests/test_object_storage.py::test_resume_in_place_cuts_a_large_fetch_into_fewer_larger_gets",),
        "a resume from S3 reads the headers of the state files it restores from one after another",
    ),
    M(
        "s3-ranged-whole-files",
        "wsd_pretrain/checkpoint/objread.py",
        "                spans.setdefault(rel, []).append((off, off + n))\n",
        '                spans.setdefault(rel, []).append((0, int(self._rec(rel)["size"])))\n',
        ("tests/test_object_storage.py::test_manager_on_s3_two_ranks",),
        "a resume from S3 reads whole files instead of each rank's byte ranges (every rank downloads everything)",
    ),
    M(
        "s3-ranged-checksum-skipped",
        "wsd_pretrain/checkpoint/objread.py",
        "            if digest.hexdigest() != expected or (nbytes is not None and total != nbytes):\n",
        "            if nbytes is not None and total != nbytes:\n",
        ("tests/test_object_storage.py::test_cp_list_inspect_verify_resume",),
        "a resume reading in place from S3 restores a damaged object (its checksum never compared)",
    ),
    M(
        "s3-lease-holder-clock",
        "wsd_pretrain/checkpoint/objstore_tier.py",
        "        if age < self.ttl:\n",
        '        if float(json.loads(raw).get("expires", 0)) > time.time():\n',
        ("tests/test_object_storage.py::test_manager_on_s3_lease_leftovers_failures",),
        "the lease's expiry is read from the holder's clock: a host whose clock is behind loses its run to another",
    ),
    # ------------------------------------------------------------------ data, config, the job, the CLI
    M(
        "data-resume-restarts-data",
        "wsd_pretrain/data.py",
        'self.samples_seen = int(state["samples_seen"])',
        "self.samples_seen = 0",
        ("tests/test_data.py::test_sampler_resumes_exactly_and_on_another_world_size",),
        "a resumed run reads the data from the start again",
    ),
    M(
        "data-ranks-read-the-same",
        "wsd_pretrain/data.py",
        "start = self.samples_seen + self.rank * self.micro",
        "start = self.samples_seen",
        ("tests/test_data.py::test_sampler_shards_ranks_and_covers_each_epoch_once",),
        "every rank reads the same sequences",
    ),
    M(
        "config-overrides-are-strings",
        "wsd_pretrain/config.py",
        'value = yaml.safe_load(raw) if raw.strip() else ""',
        "value = raw",
        ("tests/test_cli_schedule.py::test_json_output_and_overrides",),
        "a.b=1 overrides are read as strings and refused",
    ),
    M(
        "config-bool-for-int",
        "wsd_pretrain/config.py",
        "        return isinstance(value, int) and not isinstance(value, bool), value\n",
        "        return isinstance(value, int), value\n",
        ("tests/test_configs.py",),
        "true/false are accepted where a number is expected",
    ),
    M(
        "train-no-resume",
        "wsd_pretrain/train.py",
        "            resumed = manager.resume(\n",
        "            resumed = False and manager.resume(\n",
        ("tests/test_train.py::test_killed_and_resumed_run_ends_with_the_same_weights",),
        "the same command after a crash starts over instead of resuming",
    ),
    M(
        "train-ranks-share-seed",
        "wsd_pretrain/train.py",
        "    seed_everything(job.train.seed + rank)\n",
        "    seed_everything(job.train.seed)\n",
        ("tests/test_train.py::test_killed_and_resumed_run_ends_with_the_same_weights",),
        "every rank draws the same random numbers (the same dropout masks on every rank)",
    ),
    M(
        "cli-lr-last-off-by-one",
        "wsd_pretrain/cli.py",
        "        last = ph.start + ph.length - 1\n",
        "        last = ph.start + ph.length\n",
        ("tests/test_cli_schedule.py::test_default_config_table",),
        "`wsd-pretrain schedule` prints the LR of the update after each phase as its last LR",
    ),
    M(
        "cli-total-steps-ignored",
        "wsd_pretrain/cli.py",
        "return schedule.rescaled(total_steps) if total_steps is not None else schedule",
        "return schedule",
        ("tests/test_cli_schedule.py::test_total_steps_rescales",),
        "`wsd-pretrain schedule --total-steps N` shows the unscaled schedule",
    ),
    # ------------------------------------------------------------------ the checkpoint format, save and load (v2)
    M(
        "layout-fragment-absolute-start",
        "wsd_pretrain/checkpoint/layout.py",
        "                parts.append((lo - offset, hi - lo, r))",
        "                parts.append((lo, hi - lo, r))",
        ("tests/test_checkpoint_format.py::test_each_rank_writes_the_slices_it_holds",),
        "a ZeRO-1/2 fragment is recorded at its offset in the flat buffer, not in the parameter: slices land wrong",
    ),
    M(
        "layout-chunk-holder-shifted",
        "wsd_pretrain/checkpoint/layout.py",
        "                yield start, min(self.chunk, numel - start), (self.ranks[i] if self.ranks else i)",
        "                yield start, min(self.chunk, numel - start), (self.ranks[i] if self.ranks else (i + 1) % world)",
        (T_FAULTS, "tests/test_checkpoint_resume.py::test_stop_and_resume_equals_straight[fsdp2]"),
        "a chunked weight's parts are gathered from the wrong ranks: the Hugging Face shard holds scrambled rows",
    ),
    M(
        "store-chunk-reads-wrong-rank",
        "wsd_pretrain/checkpoint/store.py",
        "                out.append((s, min(p.chunk, entry.numel - s), p.ranks[i] if p.ranks else i))",
        "                out.append((s, min(p.chunk, entry.numel - s), p.ranks[i] if p.ranks else 0))",
        ("tests/test_checkpoint_manager.py::test_a_checkpoint_resumes_on_another_world_size_and_engine",),
        "a ZeRO-3/FSDP2 slice is looked for in rank 0's files whatever rank held it",
    ),
    M(
        "box-runs-ignore-box-offset",
        "wsd_pretrain/checkpoint/layout.py",
        "        start = sum((offs[d] - b_offs[d]) * strides[d] for d in range(k, ndim))",
        "        start = sum(offs[d] * strides[d] for d in range(k, ndim))",
        ("tests/test_boxes.py", T_TP_FSDP2),
        "a box read from a stored box starts at the wrong element: tensor-parallel shards are restored shifted",
    ),
    M(
        "box-read-ignores-part-range",
        "wsd_pretrain/checkpoint/store.py",
        "            hi = np.minimum(length, np.minimum(start + n - at, p_start + p_numel - src))",
        "            hi = np.minimum(length, start + n - at)",
        ("tests/test_checkpoint_manager.py::test_a_checkpoint_resumes_on_another_world_size_and_engine",),
        "a read runs past the flat range a part holds: a resume on another world size reads other ranks' bytes",
    ),
    M(
        "grid-strided-order-lost",
        "wsd_pretrain/checkpoint/adapters.py",
        "        (inner if isinstance(pl, _StridedShard) else outer)[d].append(m)",
        "        outer[d].append(m)",
        (T_TP_FSDP2,),
        "FSDP2 over tensor parallelism is described as dp-then-tp pieces: refused at build, or saved scrambled",
    ),
    M(
        "grid-box-of-any-replica",
        "wsd_pretrain/checkpoint/layout.py",
        "        if coord is None or any(coord[m] for m in range(len(coord)) if m not in self.grid.cutting):",
        "        if coord is None:",
        (T_TP_FSDP2,),
        "a tensor replicated over a mesh dimension is written by every replica, not once",
    ),
    M(
        "store-skips-slice-start-check",
        "wsd_pretrain/checkpoint/store.py",
        "                if entry is None or local is None or start != local[0] or math.prod(info.shape) != local[1]:",
        "                if entry is None or local is None or math.prod(info.shape) != local[1]:",
        ("tests/test_checkpoint_tools.py::test_verify_finds_a_slice_its_file_misplaces",),
        "a state file whose own metadata puts a slice elsewhere than the index says is read without complaint",
    ),
    M(
        "save-drops-a-slice",
        "wsd_pretrain/checkpoint/save.py",
        "                    continue\n                self._hand(f.relpath, item.key, t, made=False, later=live)",
        "                    continue",
        (T_RESUME_DDP,),
        "a rank never hands its slices to the writer: its state file is never finished",
    ),
    M(
        "save-fetch-error-not-agreed",
        "wsd_pretrain/checkpoint/save.py",
        '        coord.agree(fetch.error, f"checkpoint {name}: fetching the state failed (nothing was committed)")',
        '        coord.agree(None, f"checkpoint {name}: fetching the state failed (nothing was committed)")',
        (T_FAULTS,),
        "a rank that failed to fetch its tensors does not tell the others: they raise another error, or none",
    ),
    M(
        "commit-checksum-algorithm-dropped",
        "wsd_pretrain/checkpoint/commit.py",
        '        "checksum": checksum,\n',
        '        "checksum": DEFAULT_CHECKSUM,\n',
        ("tests/test_checksums.py",),
        "a sha256 checkpoint's manifest names xxh3_128: it can never be verified or resumed",
    ),
    M(
        "save-late-optimizer-state-unchecked",
        "wsd_pretrain/checkpoint/save.py",
        "        if check is not None:\n            check()\n",
        "        if check is not None:\n            pass\n",
        ("tests/test_deepspeed_optimizers.py",),
        "optimizer state created after the manager was built (Adafactor's factored moments) is silently left out",
    ),
    M(
        "save-report-error-dropped",
        "wsd_pretrain/checkpoint/save.py",
        '        report = {"records": records, "ranges": writer.ranges, "error": writer.error or local_error}',
        '        report = {"records": records, "ranges": writer.ranges, "error": writer.error}',
        ("tests/test_checkpoint_faults.py",),
        "a rank that fails before its report is not named: the save fails later with another error, or not at all",
    ),
    M(
        "agreement-on-the-training-group",
        "wsd_pretrain/checkpoint/coord.py",
        "    return D.all_reduce_max(values, group=groups().coord) if D.is_distributed() else list(values)",
        "    return D.all_reduce_max(values, group=None) if D.is_distributed() else list(values)",
        ("tests/test_device_only_backend.py",),
        "the per-update preemption agreement runs on the training group: a device sync per step on NCCL",
    ),
    M(
        "rank0-slices-on-the-training-group",
        "wsd_pretrain/checkpoint/save.py",
        "        group = coord.groups().coord\n",
        "        group = None\n",
        ("tests/test_device_only_backend.py",),
        "write_mode rank0 sends CPU slices on the training group, which NCCL refuses",
    ),
    M(
        "fused-adam-step-left-on-cpu",
        "wsd_pretrain/checkpoint/adapters.py",
        '    if group.get("fused") or group.get("capturable"):\n        return value.to(dtype=torch.float32, device=param.device)',
        '    if group.get("fused") or group.get("capturable"):\n        return value.to("cpu").clone()',
        ("tests/test_optimizer_state_placement.py",),
        "a fused or capturable Adam's restored step stays on the CPU: its first CUDA step fails",
    ),
    M(
        "async-snapshot-unfenced",
        "wsd_pretrain/checkpoint/save.py",
        "        _FENCE_HOOK = register_optimizer_step_pre_hook(lambda optimizer, args, kwargs: fence_snapshots())",
        "        _FENCE_HOOK = True",
        ("tests/test_async_snapshot.py::test_an_async_save_holds_the_state_at_the_save_while_training_goes_on",),
        "an async save's copies race the next optimizer step: the checkpoint mixes two steps' state",
    ),
    M(
        "async-arena-no-padding",
        "wsd_pretrain/checkpoint/save.py",
        "        need = nbytes + self._ALIGN * (count + 1)",
        "        need = nbytes + self._ALIGN * 64",
        ("tests/test_async_snapshot.py::test_an_async_save_of_many_small_tensors_fits_its_buffer",),
        "the async host buffer leaves 4 KB for alignment: a torch AdamW over ~70 parameters overflows it",
    ),
    M(
        "async-snapshot-buffers-later",
        "wsd_pretrain/checkpoint/save.py",
        "                    later = item.partition.replicated and item.name not in self._buffers",
        "                    later = item.partition.replicated",
        ("tests/test_async_snapshot.py::test_buffers_are_copied_before_the_save_returns",),
        "buffers wait for the optimizer step, but a forward pass changes them first (running statistics)",
    ),
    M(
        "load-verify-nothing",
        "wsd_pretrain/checkpoint/load.py",
        '        return F.check_files(ckpt, share, checksums=mode == "checksum", keep=keep)',
        "        return []",
        ("tests/test_checkpoint_manager.py::test_corruption_is_named_and_sizes_only_catch_truncation",),
        "resume loads a checkpoint whose files were corrupted",
    ),
    M(
        "load-master-from-model",
        "wsd_pretrain/checkpoint/load.py",
        '    hp = ("master", want.name) if want.name in described["master"] else ("model", want.name)',
        '    hp = ("model", want.name)',
        ("tests/test_checkpoint_resume.py::test_stop_and_resume_equals_straight[ds1-bf16]",),
        "the fp32 master weights are restored from the bf16 model weights: precision is lost on every resume",
    ),
    M(
        "format-newer-version-accepted",
        "wsd_pretrain/checkpoint/format.py",
        "    if version > FORMAT_VERSION:",
        "    if version > FORMAT_VERSION + 1:",
        ("tests/test_checkpoint_integrity.py",),
        "a checkpoint of a newer format is read as if it were this one",
    ),
    M(
        "format-manifest-hash-ignored",
        "wsd_pretrain/checkpoint/format.py",
        "    if digest != raw[1]:",
        "    if False:",
        ("tests/test_checkpoint_integrity.py",),
        "an edited manifest (still valid JSON) is trusted",
    ),
    M(
        "torch-adapter-optimizer-not-restored",
        "wsd_pretrain/checkpoint/adapters.py",
        "            state[key] = self._state_value(p, key, value, group)",
        "            pass",
        (T_RESUME_DDP,),
        "DDP and plain torch resume with fresh Adam moments",
    ),
    M(
        "fsdp2-reads-rank-0-rows",
        "wsd_pretrain/checkpoint/adapters.py",
        "        start = min(index * part.chunk, p.numel())",
        "        start = 0",
        ("tests/test_checkpoint_resume.py::test_stop_and_resume_equals_straight[fsdp2]",),
        "every FSDP2 rank restores the first rank's rows",
    ),
    M(
        "deepspeed-fragment-master-not-restored",
        "wsd_pretrain/checkpoint/deepspeed_adapter.py",
        "                    link.hp_fragment.copy_(hp.to(link.hp_fragment.dtype))",
        "                    pass",
        ("tests/test_checkpoint_resume.py::test_stop_and_resume_equals_straight[ds1-bf16]",),
        "ZeRO-1/2 resume with fresh fp32 master weights",
    ),
    M(
        "deepspeed-int-step-not-saved",
        "wsd_pretrain/checkpoint/deepspeed_adapter.py",
        "            elif not isinstance(value, torch.Tensor) and is_json_scalar(value):\n                scalars[key] = _jsonable(value)",
        "            elif False:\n                scalars[key] = _jsonable(value)",
        ("tests/test_deepspeed_optimizers.py",),
        "FusedAdam's and DeepSpeedCPUAdam's int step is dropped: Adam's bias correction starts over after a resume",
    ),
    M(
        "deepspeed-cpu-adam-not-replayed",
        "wsd_pretrain/checkpoint/deepspeed_adapter.py",
        "        if not on_cpu_kernel:\n            return",
        "        if True:\n            return",
        ("tests/test_deepspeed_optimizers.py",),
        "DeepSpeed's CPU Adam kernels start from pow(beta, t): resumed updates differ in the last bit",
    ),
    M(
        "resume-optimizer-class-unchecked",
        "wsd_pretrain/checkpoint/resume_checks.py",
        "    if not saved or not live or saved == live or saved == UNKNOWN_CLASS:\n        return None",
        "    if True:\n        return None",
        ("tests/test_resume_changes.py::test_another_optimizer_class_is_refused_before_anything_is_restored",),
        "an AdamW checkpoint resumes into SGD (Adam's moments left in SGD's state) and an SGD one into AdamW (a "
        "KeyError at the first step)",
    ),
    M(
        "resume-hyperparameters-unchecked",
        "wsd_pretrain/checkpoint/resume_checks.py",
        "            if old != new:\n                changes.append(Change(key, i, old, new))",
        "            if False:\n                changes.append(Change(key, i, old, new))",
        ("tests/test_resume_changes.py::test_changed_hyperparameters_are_refused_or_applied_per_field",),
        "a resume with other betas, eps or weight decay in the config keeps the checkpoint's without a word",
    ),
    M(
        "resume-lr-change-ignored",
        "wsd_pretrain/checkpoint/resume_checks.py",
        "            if float(old) != float(new):",
        "            if False:",
        ("tests/test_resume_changes.py::test_changed_hyperparameters_are_refused_or_applied_per_field",),
        "a resume with optimizer.lr changed trains on at the checkpoint's LR while config.yaml records the new one",
    ),
    M(
        "tools-reshard-master-dropped",
        "wsd_pretrain/checkpoint/tools.py",
        '            if not store.has("master", name) and self._keeps_master(e.dtype):',
        "            if False:",
        ("tests/test_checkpoint_tools.py::test_reshard_to_bf16_and_back_loses_nothing_that_matters",),
        "resharding an fp32 checkpoint to bf16 throws the exact fp32 weights away",
    ),
    # ------------------------------------------------------------------ snapshots and merging (WSM)
    M(
        "merge-inputs-unordered",
        "wsd_pretrain/checkpoint/merge.py",
        "    paths, manifests = [paths[i] for i in order], [manifests[i] for i in order]\n",
        "",
        ("tests/test_merge.py::test_merge_is_the_in_memory_average_on_every_format",),
        "checkpoints given newest first get the oldest one's coefficient: the merge emulates the decay backwards",
    ),
    M(
        "merge-decay-point-weights",
        "wsd_pretrain/checkpoint/merge.py",
        "    coeffs = [1.0 - means[0]]",
        "    means = [decay_factor(name, bounds[j] / n, min_lr_ratio) for j in range(1, k + 1)]\n    coeffs = [1.0 - means[0]]",
        ("tests/test_merge.py::test_decay_coefficients_reproduce_the_schedules_decay",),
        "each segment weighed by the LR at its end instead of the mean over its updates: not the decay it emulates",
    ),
    M(
        "snapshot-retention-uses-keep-last",
        "wsd_pretrain/checkpoint/manager.py",
        "complete, keep_last=self.config.snapshot_keep,",
        "complete, keep_last=self.config.keep_last,",
        ("tests/test_merge.py::test_snapshots_cadence_retention_and_resume",),
        "snapshots rotate with the checkpoints' keep_last: the merge window is deleted",
    ),
    M(
        "snapshot-resumable",
        "wsd_pretrain/checkpoint/load.py",
        '    manifest = F.load_manifest(ckpt)\n    if F.SNAPSHOT_KIND in manifest["kinds"]:',
        "    manifest = F.load_manifest(ckpt)\n    if False:",
        ("tests/test_merge.py::test_snapshots_cadence_retention_and_resume",),
        "a model-only snapshot is loaded as a checkpoint (no optimizer state: a silent reset)",
    ),
    M(
        "names-wrapper-segment-kept",
        "wsd_pretrain/checkpoint/names.py",
        "            if atom == attr:\n                consumed = True\n                break",
        '            if atom == attr and attr == "module":\n                consumed = True\n                break',
        (
            "tests/test_model_wrappers.py::test_canonical_names_follow_torch_distributed_checkpoint",
            "tests/test_model_wrappers.py::test_toggled_wrappers_resume_exactly",
        ),
        "a compiled or activation-checkpointed model's names keep _orig_mod. / _checkpoint_wrapped_module.: "
        "from_pretrained loads none of them and the run cannot resume with the wrappers toggled",
    ),
    M(
        "names-state-dict-unchecked",
        "wsd_pretrain/checkpoint/adapters.py",
        "    check_state_dict(module, params, tied, buffers)\n",
        "",
        ("tests/test_model_wrappers.py::test_state_dict_that_is_not_the_parameters_is_refused_when_built",),
        "a model whose state_dict is not its parameters is accepted: its names are written as nothing loads them",
    ),
    M(
        "optimizer-state-reshaped-to-param",
        "wsd_pretrain/checkpoint/adapters.py",
        "        return value.to(p.device)\n",
        "        return value.to(p.device).view(p.shape)\n",
        ("tests/test_model_wrappers.py::test_adafactor_resumes_exactly_on_one_process",),
        "Adafactor's factored row/column variances are forced into the parameter's shape: its checkpoint cannot resume",
    ),
    M(
        "optimizer-state-fsdp2-unshaped-accepted",
        "wsd_pretrain/checkpoint/adapters.py",
        "                if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != tuple(p.shape):",
        "                if False:",
        ("tests/test_model_wrappers.py::test_wrapped_models_on_two_ranks",),
        "under FSDP2 a factored optimizer state is written with the parameter's sharding: the save or resume fails",
    ),
    M(
        "names-legacy-aliases-dropped",
        "wsd_pretrain/checkpoint/load.py",
        '    return group, described.get("aliases", {}).get(f"{group}/{name}", name), cast',
        "    return group, name, cast",
        ("tests/test_model_wrappers.py::test_a_compiled_run_saved_before_the_name_rule_resumes_bare_or_compiled",),
        "a compiled run's checkpoint from before the name rule (_orig_mod. names) can no longer be resumed",
    ),
    M(
        "scaler-not-restored",
        "wsd_pretrain/checkpoint/scaler.py",
        "    if scaler is not None and saved is not None:\n        scaler.load_state_dict(saved)",
        "    if scaler is not None and saved is not None:\n        pass",
        ("tests/test_model_wrappers.py::test_grad_scaler_is_saved_and_restored",),
        "a GradScaler's scale and growth tracker are lost on resume",
    ),
    M(
        "lora-config-json-written",
        "wsd_pretrain/checkpoint/lora.py",
        "    return None, files\n",
        "    return hf_config, files\n",
        ("tests/test_lora.py",),
        "a PEFT model's folder gets its base's config.json: from_pretrained loads it with random weights",
    ),
    # ------------------------------------------------------------------ the run lock and the manager's guard rails
    M(
        "lock-held-by-forked-children",
        "wsd_pretrain/checkpoint/lock.py",
        "os.register_at_fork(after_in_child=_after_fork_in_child)",
        "pass",
        ("tests/test_run_lock.py::test_a_restart_right_after_sigkill_is_not_refused_by_the_trainers_children",),
        "a trainer's DataLoader workers keep the run lock after it is SIGKILLed: the requeued job is refused",
    ),
    M(
        "lock-same-process-not-told",
        "wsd_pretrain/checkpoint/lock.py",
        "        if other is not None and other.held:",
        "        if False:",
        ("tests/test_run_lock.py::test_a_second_lock_in_the_same_process_is_told_so",),
        "a second manager in the same process is told another process (its own pid) holds the directory",
    ),
    M(
        "manager-closed-still-saves",
        "wsd_pretrain/checkpoint/manager.py",
        "        if self._closed:\n            raise CheckpointError(",
        "        if False:\n            raise CheckpointError(",
        (
            "tests/test_checkpoint_guards.py::test_after_close_every_method_refuses_and_the_lock_is_freed_by_with_and_by_garbage_collection",
        ),
        "maybe_save() after close() writes a checkpoint while another manager holds the run lock",
    ),
    M(
        "init-shard-offset-ignored",
        "wsd_pretrain/init.py",
        "        fill_box_(local, seed, name, data.shape, offset, std=std)",
        "        fill_box_(local, seed, name, data.shape, (0,) * data.dim(), std=std)",
        ("tests/test_meta_init.py::test_every_layout_starts_from_the_same_bits_and_a_rank_allocates_its_share",),
        "every rank draws its shard as if it were the tensor's first box: FSDP2/TP ranks start from repeated values",
    ),
    M(
        "guard-meta-model-accepted",
        "wsd_pretrain/checkpoint/guards.py",
        "    if meta:\n        shown",
        "    if False:\n        shown",
        ("tests/test_checkpoint_guards.py::test_a_model_on_the_meta_device_is_refused_when_the_manager_is_built",),
        "a model on the meta device 'saves' and 'resumes' and stays on meta",
    ),
    M(
        "guard-foreign-optimizer-accepted",
        "wsd_pretrain/checkpoint/guards.py",
        "        if foreign:\n",
        "        if False:\n",
        ("tests/test_checkpoint_guards.py::test_an_optimizer_over_parameters_the_model_does_not_have_is_refused",),
        "an optimizer over another module's parameters is accepted and its state is never saved",
    ),
    # ------------------------------------------------------------------ the ranks agree on one plan at build
    M(
        "agreement-digests-ignored",
        "wsd_pretrain/checkpoint/agreement.py",
        "    if not got[0] and hi_s == lo_s and hi_v == lo_v:",
        "    if not got[0]:",
        (T_AGREEMENT,),
        "a pipeline-stage job builds its manager and commits a checkpoint of stage 0's weights alone",
    ),
    M(
        "agreement-values-not-compared",
        "wsd_pretrain/checkpoint/agreement.py",
        "        prints = fingerprints({it.name: adapter.local(it) for it in replicated})",
        "        prints = {}",
        (T_AGREEMENT,),
        "stages renumbered from 0 on every rank are written as one replica: the stages' weights and state are mixed",
    ),
    M(
        "torch-adapter-tp-as-replica",
        "wsd_pretrain/checkpoint/adapters.py",
        '        grid = dtensor_partition(p, self._name_of.get(id(p), "?"))\n        if grid is not None:\n            return grid',
        "        grid = None",
        ("tests/test_tensor_parallel.py::test_tensor_parallel_alone_resumes_bitwise",),
        "a tensor-parallel model's shards are taken as whole replicas: refused as ranks that differ, or written wrong",
    ),
    # ------------------------------------------------------------------ DeepSpeed AutoTP
    M(
        "deepspeed-pipe-tied-weight-per-stage",
        "wsd_pretrain/checkpoint/deepspeed_adapter.py",
        "                    continue\n                owner[name] = (s, row)",
        "                owner[name] = (s, row)",
        (T_DSPIPE,),
        "a PipelineModule's tied embedding/head is listed by both stages: the model folder holds it twice (or the plan "
        "refuses the save)",
    ),
    M(
        "deepspeed-pipe-stage-groups-unchecked",
        "wsd_pretrain/checkpoint/deepspeed_adapter.py",
        '            if len(seen) > 1:\n                raise CheckpointError(f"pipeline stage {s}: its ranks disagree',
        '            if False:\n                raise CheckpointError(f"pipeline stage {s}: its ranks disagree',
        (
            "tests/test_deepspeed_pipe.py::"
            "test_a_pipeline_grid_the_manager_does_not_understand_is_refused_before_any_description_moves",
        ),
        "the ranks of a pipeline stage that give different data-parallel groups are not refused at build: the "
        "stage's description (from its first rank) is taken for ranks it does not describe",
    ),
    M(
        "deepspeed-pipe-stage-rank-not-translated",
        "wsd_pretrain/checkpoint/deepspeed_adapter.py",
        "Partition(parts=tuple((a, n, ranks[r]) for a, n, r in frags))",
        "Partition(parts=tuple((a, n, r) for a, n, r in frags))",
        (T_DSPIPE,),
        "a pipeline stage's ZeRO fragments are given to the stage-local data-parallel rank numbers: the first stage's "
        "ranks are asked for the last stage's master and optimizer state",
    ),
    M(
        "deepspeed-pipe-main-job-names-not-mapped",
        "wsd_pretrain/checkpoint/deepspeed_adapter.py",
        "            if names is not None:\n                self._rename(names)",
        "            if False:\n                self._rename(names)",
        (T_DSPIPE_MAIN,),
        "the main job's DeepSpeed pipeline writes its model folder under the PipelineModule's '<layer>.<name>' names: "
        "from_pretrained finds none of the model's weights",
    ),
    M(
        "autotp-refused-as-plain-data-parallel",
        "wsd_pretrain/checkpoint/deepspeed_adapter.py",
        "        if tp > 1:\n            problems.append(self._autotp_problem(tp))\n        elif pp > 1",
        "        if False:\n            pass\n        elif pp > 1",
        (T_AUTOTP,),
        "an AutoTP job is refused as 'only pure data parallelism', without naming AutoTP or the from-deepspeed way out",
    ),
    M(
        "autotp-module-slice-as-replica",
        "wsd_pretrain/checkpoint/adapters.py",
        '        if getattr(p, "ds_is_replaced_module", False):',
        "        if False:",
        (T_AUTOTP,),
        "an AutoTP engine's module is taken as replicas: refused as ranks holding different values, with the wrong fix",
    ),
    M(
        "autotp-import-concatenates-slices",
        "wsd_pretrain/checkpoint/convert_deepspeed.py",
        "        for t, piece in enumerate(slices):\n            full[part.index(t)] = piece.reshape(part.boxes[t][1])\n"
        "        return full.reshape(-1)",
        "        return torch.cat([piece.reshape(-1) for piece in slices])",
        (T_AUTOTP,),
        "from-deepspeed lays the TP slices of a row-parallel weight (o_proj, down_proj: cut on dim 1) end to end",
    ),
    M(
        "range-write-offset-ignored",
        "wsd_pretrain/checkpoint/save.py",
        "                at = (offsets[item.name] + start * t.element_size(), size, holder)",
        "                at = (offsets[item.name], size, holder)",
        (T_RANGES,),
        "every holder writes its range at the start of the tensor: the model files hold one rank's rows, the rest zeros",
    ),
    M(
        "range-holders-unverified",
        "wsd_pretrain/checkpoint/format.py",
        '        if checksums and ranges.get("holders"):',
        '        if False and ranges.get("holders"):',
        (T_RANGES,),
        "verify and resume never check the ranges the holders wrote: a corrupt model weight is loaded silently",
    ),
    M(
        "read-once-wrong-bytes",
        "wsd_pretrain/checkpoint/safetensors_io.py",
        "        return memoryview(data)[offset - base : offset - base + nbytes]",
        "        return memoryview(data)[:nbytes]",
        (T_RANGES,),
        "a checksum-verified resume restores the wrong bytes from what its verification read",
    ),
    M(
        "assembly-piece-corner",
        "wsd_pretrain/checkpoint/save.py",
        "    return t.view(src_box[1])[tuple(slice(o - s, o - s + k) for o, k, s in zip(inter[0], inter[1], src_box[0]))]",
        "    return t.view(src_box[1])[tuple(slice(0, k) for o, k, s in zip(inter[0], inter[1], src_box[0]))]",
        ("tests/test_tensor_parallel.py::test_tensor_parallel_alone_resumes_bitwise",),
        "a holder sends the corner of its column block instead of the rows its writer assembles: wrong model rows",
    ),
    M(
        "balance-shift-dropped",
        "wsd_pretrain/checkpoint/layout.py",
        "                yield start, min(self.chunk, numel - start), (self.ranks[i] if self.ranks else i) + self.shift",
        "                yield start, min(self.chunk, numel - start), (self.ranks[i] if self.ranks else i)",
        (
            "tests/test_range_writes.py::test_dim1_shards_are_assembled_in_their_tp_group_and_the_busiest_writers_are_relieved",
        ),
        "a part moved for balance is still written (and verified) at its holder, not the rank the plan moved it to",
    ),
    M(
        "rows-moved-bytes-uncounted",
        "wsd_pretrain/checkpoint/layout.py",
        "                own = _own_rows(item, writer, world) * size",
        "                own = held",
        (
            "tests/test_range_writes.py::test_dim1_shards_are_assembled_in_their_tp_group_and_the_busiest_writers_are_relieved",
        ),
        "the bytes a dim-1 TP shard's assembly moves are not counted: scale_report would show the TP rows as free",
    ),
    M(
        "span-read-offset-lost",
        "wsd_pretrain/checkpoint/store.py",
        "                    out[a : a + k] = span[s - first : s - first + k]",
        "                    out[a : a + k] = span[a : a + k]",
        ("tests/test_tensor_parallel.py::test_tensor_parallel_alone_resumes_bitwise",),
        "a column block read as one span is copied from the span's start, not from each run's place in it",
    ),
    M(
        "tracking-not-closed-on-error",
        "wsd_pretrain/train.py",
        "                tracker.close(failed=not ok)",
        "                pass",
        ("tests/test_tracking.py::test_preempted_async_run_and_a_failing_run_close_their_trackers",),
        "a job that fails leaves its W&B run unfinished (no exit record, its history cut short)",
    ),
    M(
        "tracking-lr-marker-after-the-update",
        "wsd_pretrain/tracking.py",
        'values[f"lr/{kind}"] = float(record["lr"])',
        'values[f"lr/{kind}"] = float(record["lr"]) * 0.5',
        ("tests/test_tracking.py::test_tensorboard_events_hold_the_metrics_the_schedule_and_the_checkpoints",),
        "the pre-decay and post-decay markers are off the LR curve",
    ),
    # ------------------------------------------------------------------ pipeline-parallel stages (pipeline.py)
    M(
        "pipeline-union-own-stages",
        "wsd_pretrain/checkpoint/pipeline.py",
        'stages = sorted((st for e in everyone for st in e["stages"]), key=lambda st: st["stage"])',
        'stages = sorted((st for e in everyone[self.pp_pos : self.pp_pos + 1] for st in e["stages"]), key=lambda st: st["stage"])',
        (T_PIPELINE,),
        "each rank plans from its own stages only: the issue's bug (stage 0's weights alone in the model folder), "
        "now refused at build by the digest agreement instead of saving the pipeline",
    ),
    M(
        "pipeline-union-first-stage",
        "wsd_pretrain/checkpoint/pipeline.py",
        """                values.setdefault(name, fp)
        missing =""",
        """                values.setdefault(name, fp)
            break  # (mutation) the union stops after the first stage
        missing =""",
        (T_PIPELINE,),
        "every rank agrees on a union of the first stage alone: a stage-only model folder is committed",
    ),
    M(
        "pipeline-tied-restore-owner-only",
        "wsd_pretrain/checkpoint/pipeline.py",
        "local_saved = {n: saved[self.source(g)] for n, g in names.items() if self.source(g) in saved}",
        "local_saved = {n: saved[self.source(g)] for n, g in names.items() if g in saved}",
        (T_PIPELINE,),
        "a tied weight's copy on the last stage (the output projection) gets its weight back but not its optimizer "
        "state: training after a resume differs from training straight on",
    ),
    # ------------------------------------------------------------------ every entry point on URLs (i-urls)
    M(
        "s3-main-job-metrics-not-continued",
        "wsd_pretrain/train.py",
        '                    run_files.fetch_missing("metrics.jsonl")\n',
        "                    pass  # (mutation) the bucket's metrics are not taken first\n",
        ("tests/test_object_storage_urls.py::test_main_job_on_s3_without_staging",),
        "a main job resumed from the bucket into an empty log folder overwrites the run's metrics on the bucket with "
        "the updates after the resume: the history before it is lost",
    ),
    M(
        "s3-merge-last-oldest",
        "wsd_pretrain/cli.py",
        "sources.extend(snaps[-args.last :])",
        "sources.extend(snaps[: args.last])",
        ("tests/test_object_storage_urls.py::test_ckpt_commands_write_to_and_read_from_urls",),
        "merge --last K from a bucket averages the run's oldest K snapshots instead of its newest K",
    ),
    # ------------------------------------------------------------------ the HF Trainer resuming from s3:// (i-hfurl)
    M(
        "hf-s3-each-rank-decides",
        "wsd_pretrain/integrations/hf.py",
        "    if not D.is_distributed() or D.get_world_size() == 1:\n        return fn()\n",
        "    if True:  # (mutation) every rank lists the bucket and decides on its own\n        return fn()\n",
        ("tests/test_object_storage_urls.py::test_hf_trainer_on_s3_two_ranks",),
        "last_checkpoint on an s3:// run decided by each rank from its own listing: a rank with a stale listing "
        "resumes another checkpoint (or none), and an error on rank 0 alone leaves the other ranks going on",
    ),
    M(
        "hf-s3-whole-checkpoint",
        "wsd_pretrain/integrations/hf.py",
        '    return sorted(rel for rel in manifest["files"] if not rel.startswith(F.TRAIN_STATE + "/"))\n',
        '    return sorted(manifest["files"])\n',
        ("tests/test_object_storage_urls.py::test_hf_trainer_on_s3",),
        "last_checkpoint on an s3:// run downloads the optimizer state onto every node too (1.1 TB a node at 70B), "
        "which the manager reads from the bucket anyway",
    ),
    # ------------------------------------------------------------------ wsm and the DCP tools on URLs (i-wsm)
    M(
        "folder-upload-commit-file-first",
        "wsd_pretrain/checkpoint/objstore.py",
        "key=lambda p: (p.name == last, str(p))",
        "key=lambda p: (p.name != last, str(p))",
        ("tests/test_wsm_urls.py::test_dcp_conversions_with_url_outputs[s3]",),
        "a folder uploaded to a bucket (export-hf, merge, to-dcp, from-dcp, the wsm merges) writes config.json / "
        ".metadata first: a reader finds it while the weights it names are still missing",
    ),
    M(
        "wsm-bucket-replay-not-replaced",
        "wsd_pretrain/wsm.py",
        "if objstore.remove_folder(store, dest):",
        "if False:",
        ("tests/test_wsm_urls.py::test_wsm_on_a_bucket_merges_as_on_disk_and_resumes[s3]",),
        "a run on a bucket resumed before a milestone it had merged fails at the merge (the killed run's objects "
        "are in the way) instead of replacing it",
    ),
    M(
        "wsm-resume-skips-lost-merge",
        "wsd_pretrain/wsm.py",
        "if at > position or self._merged(manager, at):",
        "if True:",
        ("tests/test_wsm_urls.py::test_wsm_on_a_bucket_merges_as_on_disk_and_resumes[s3]",),
        "a job killed during a merge, after a checkpoint at that milestone, resumes past it: the milestone's merged "
        "model is never written (or stays half uploaded)",
    ),
]


class StaleMutation(Exception):
    """A mutation's old text is not in its file exactly once (the code moved and the list must be updated), or an
    entry is malformed (a duplicate id, no tests, a mutated file that does not compile)."""


@dataclass
class Result:
    mutation: Mutation
    status: str  # caught, MISSED, error
    seconds: float
    detail: str = ""


def check_list(mutations: Sequence[Mutation], root: Path = ROOT) -> None:
    """Raise StaleMutation naming every entry whose old text is not found exactly once, and refuse duplicate ids."""
    problems = []
    seen: set[str] = set()
    for m in mutations:
        if m.id in seen:
            problems.append(f"{m.id}: the id is used twice")
        seen.add(m.id)
        path = root / m.file
        if not path.is_file():
            problems.append(f"{m.id}: {m.file} does not exist")
            continue
        text = path.read_text()
        count = text.count(m.old)
        if count != 1:
            where = "not found" if count == 0 else f"found {count} times"
            problems.append(f"{m.id}: the old text is {where} in {m.file}: {m.old[:70]!r}")
        elif path.suffix == ".py":
            try:
                compile(text.replace(m.old, m.new), str(path), "exec")
            except SyntaxError as exc:  # a mutation is a bug, not a syntax error
                problems.append(f"{m.id}: the mutated {m.file} does not compile: {exc}")
        if m.old == m.new:
            problems.append(f"{m.id}: the new text is the old one")
        if not m.tests:
            problems.append(f"{m.id}: no tests to run")
    if problems:
        raise StaleMutation(
            "the mutation list is out of date (the code moved: update these entries in tools/mutation_check.py):\n  "
            + "\n  ".join(problems)
        )


def make_copy(dest: Path, root: Path = ROOT) -> Path:
    """The repository's working tree (without .git, .venv, runs and caches) copied to ``dest``."""
    shutil.copytree(root, dest, ignore=shutil.ignore_patterns(*COPY_IGNORE), symlinks=True)
    return dest


def apply(copy: Path, m: Mutation) -> None:
    path = copy / m.file
    text = path.read_text()
    if text.count(m.old) != 1:
        raise StaleMutation(f"{m.id}: the old text is not in {m.file} exactly once")
    path.write_text(text.replace(m.old, m.new))


def copy_env(copy: Path) -> dict[str, str]:
    """The copy first on PYTHONPATH (the package and the test helpers), for pytest and every process it starts."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(copy), str(copy / "tests"), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.pop("PYTEST_ADDOPTS", None)
    azurite = ROOT / ".cache" / "azurite" / "node_modules" / ".bin" / "azurite-blob"
    if azurite.exists():  # the emulator of the az:// tests stays where setup.sh put it (not copied: 22k files)
        env.setdefault("WSD_AZURITE", str(azurite))
    return env


def check_isolation(copy: Path, python: str = sys.executable) -> None:
    """Fail unless a process started with the copy's environment imports the copy's package."""
    code = "import wsd_pretrain, engines; print(wsd_pretrain.__file__); print(engines.__file__)"
    res = subprocess.run([python, "-c", code], cwd=copy, env=copy_env(copy), capture_output=True, text=True)
    files = res.stdout.split()
    if (
        res.returncode != 0
        or len(files) != 2
        or not all(Path(f).resolve().is_relative_to(copy.resolve()) for f in files)
    ):
        raise RuntimeError(f"the copy at {copy} is not what gets imported: {res.stdout}{res.stderr[-2000:]}")


def run_pytest(copy: Path, tests: Sequence[str], timeout: float, python: str = sys.executable, stop: bool = True):
    cmd = [python, "-m", "pytest", *(["-x"] if stop else []), "-q", "-p", "no:cacheprovider", *tests]
    return subprocess.run(cmd, cwd=copy, env=copy_env(copy), capture_output=True, text=True, timeout=timeout)


def _first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" - ")[0]
    return output.strip().splitlines()[-1] if output.strip() else ""


def run_mutations(
    mutations: Sequence[Mutation],
    *,
    root: Path = ROOT,
    timeout: float = 1800.0,
    python: str = sys.executable,
    baseline: bool = True,
    log: Callable[[str], None] = print,
) -> list[Result]:
    """Run every mutation against its tests (each in a fresh copy of ``root``); the list is checked first."""
    check_list(mutations, root)
    with tempfile.TemporaryDirectory(prefix="wsd-mutation-") as tmp:
        clean = make_copy(Path(tmp) / "clean", root)
        check_isolation(clean, python)
        if baseline:
            selections = sorted({t for m in mutations for t in m.tests})
            t0 = time.monotonic()
            res = run_pytest(clean, selections, timeout * 2, python, stop=False)
            if res.returncode != 0:
                raise RuntimeError(
                    "the tests fail without any mutation, so a mutation's failure would prove nothing:\n"
                    + res.stdout[-4000:]
                )
            log(f"baseline: {len(selections)} selections pass unmutated ({time.monotonic() - t0:.0f}s)")
    results = []
    for m in mutations:
        t0 = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"wsd-mutant-{m.id}-") as tmp:
            copy = make_copy(Path(tmp) / "repo", root)
            apply(copy, m)
            try:
                res = run_pytest(copy, m.tests, timeout, python)
                code, out = res.returncode, res.stdout + res.stderr
            except subprocess.TimeoutExpired:
                code, out = -1, f"timed out after {timeout:.0f}s"
        seconds = time.monotonic() - t0
        if code == 1:
            result = Result(m, "caught", seconds, _first_failure(out))
        elif code == 0:
            result = Result(m, "MISSED", seconds, "every selected test passed")
        else:  # 2-5: interrupted, internal error, usage error (a wrong node id), nothing collected; or a timeout
            result = Result(m, "error", seconds, f"pytest exit {code}: {_first_failure(out)}")
        why = next((ln.strip() for ln in out.splitlines() if ln.startswith("E ")), "") if code == 1 else ""
        log(f"{result.status:7s} {m.id} ({seconds:.0f}s) {result.detail}" + (f"\n        {why[:200]}" if why else ""))
        results.append(result)
    return results


def markdown_table(results: Sequence[Result]) -> str:
    rows = ["| mutation | file | what it breaks | caught by | result | seconds |", "|---|---|---|---|---|---|"]
    for r in results:
        m = r.mutation
        by = r.detail.removeprefix("FAILED ").removeprefix("ERROR ") if r.status == "caught" else r.detail
        rows.append(
            f"| `{m.id}` | `{m.file.removeprefix('wsd_pretrain/')}` | {m.breaks} | `{by}` | {r.status} | "
            f"{r.seconds:.0f} |"
        )
    caught = sum(r.status == "caught" for r in results)
    return "\n".join(rows) + f"\n\n{caught} of {len(results)} caught."


def write_table(path: Path, results: Sequence[Result]) -> None:
    """Replace the table between the mutation-table markers in ``path``."""
    text = path.read_text()
    if TABLE_START not in text or TABLE_END not in text:
        raise ValueError(f"{path} has no {TABLE_START} ... {TABLE_END} markers")
    block = f"{TABLE_START}\n{markdown_table(results)}\n{TABLE_END}"
    path.write_text(re.sub(re.escape(TABLE_START) + ".*?" + re.escape(TABLE_END), lambda _: block, text, flags=re.S))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated mutation ids (default: all)")
    ap.add_argument("--list", action="store_true", help="print the mutations and exit")
    ap.add_argument("--no-baseline", action="store_true", help="do not run the selections unmutated first")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per mutation (default 1800)")
    ap.add_argument("--markdown", type=Path, default=None, help="rewrite the table in this file (docs/testing.md)")
    args = ap.parse_args(argv)
    chosen = MUTATIONS
    if args.only:
        wanted = [s.strip() for s in args.only.split(",") if s.strip()]
        by_id = {m.id: m for m in MUTATIONS}
        unknown = [w for w in wanted if w not in by_id]
        if unknown:
            ap.error(f"--only: unknown mutation(s) {unknown}; see --list")
        chosen = [by_id[w] for w in wanted]
    if args.list:
        for m in chosen:
            print(f"{m.id:40s} {m.file:40s} {m.breaks}")
        return 0
    try:
        results = run_mutations(chosen, timeout=args.timeout, baseline=not args.no_baseline)
    except StaleMutation as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print()
    print(markdown_table(results))
    if args.markdown is not None:
        write_table(args.markdown, results)
        print(f"wrote the table into {args.markdown}")
    if any(r.status == "error" for r in results):
        return 2
    return 1 if any(r.status == "MISSED" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
