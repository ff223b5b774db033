"""Training strategies by name: DDP and DeepSpeed ZeRO 1/2/3 (+ CPU offload), on GPUs or CPUs.

``build_strategy(name, **options)`` is what ``conf/strategy/*.yaml`` instantiates. On a CUDA
machine it returns Lightning's own ``DeepSpeedStrategy``; without CUDA (tests, CPU-only
clusters) it returns ``CPUDeepSpeedStrategy``, a thin subclass that lifts Lightning's
CUDA-only assumptions and runs ZeRO over gloo with DeepSpeed's CPU accelerator.

    strategy = build_strategy("deepspeed_stage_3", allgather_bucket_size=5e8)
    trainer = Trainer(accelerator="auto", devices=8, strategy=strategy, precision="bf16-mixed")
"""

from __future__ import annotations

import argparse
import inspect
import os
import types
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.utils.checkpoint
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, Strategy
from torch import nn

from sora_train.utils.errors import SoraError
from sora_train.utils.logging import get_logger

if TYPE_CHECKING:
    import deepspeed

log = get_logger(__name__)

# Stage name -> DeepSpeedStrategy arguments it implies. Options given to build_strategy win.
_DEEPSPEED_STAGES: dict[str, dict[str, Any]] = {
    "deepspeed_stage_1": {"stage": 1},
    "deepspeed_stage_2": {"stage": 2},
    "deepspeed_stage_3": {"stage": 3},
    "deepspeed_stage_2_offload": {"stage": 2, "offload_optimizer": True},
    "deepspeed_stage_3_offload": {"stage": 3, "offload_optimizer": True, "offload_parameters": True},
}
STRATEGY_NAMES: tuple[str, ...] = ("auto", "ddp", *_DEEPSPEED_STAGES)

# DDPStrategy options we expose; anything else in DDPStrategy(**kwargs) goes to
# torch.nn.parallel.DistributedDataParallel, so the list is explicit to catch typos early.
_DDP_OPTIONS = frozenset({
    "process_group_backend",
    "timeout",
    "find_unused_parameters",
    "static_graph",
    "gradient_as_bucket_view",
    "bucket_cap_mb",
    "broadcast_buffers",
})
# Arguments of DeepSpeedStrategy.__init__ that are wiring, not options (the Trainer sets them).
_DEEPSPEED_WIRING = frozenset({"self", "accelerator", "parallel_devices", "cluster_environment", "precision_plugin"})
# Our additions to DeepSpeedStrategy's arguments, written into its DeepSpeed config dict:
#   zero_force_ds_cpu_optimizer: with offload_optimizer, refuse torch optimizers (DeepSpeed's
#     default True wants DeepSpeedCPUAdam; CPUDeepSpeedStrategy defaults it to False);
#   zero_extra: more "zero_optimization" keys Lightning does not expose, e.g.
#     stage3_prefetch_bucket_size, stage3_param_persistence_threshold, stage3_max_live_parameters.
_DEEPSPEED_EXTRA = frozenset({"zero_force_ds_cpu_optimizer", "zero_extra"})


def _deepspeed_options() -> frozenset[str]:
    params = inspect.signature(DeepSpeedStrategy.__init__).parameters
    return frozenset(params) - _DEEPSPEED_WIRING | _DEEPSPEED_EXTRA


def use_deepspeed_cpu_accelerator() -> None:
    """Make DeepSpeed use its CPU accelerator in this process and in processes it starts.

    DeepSpeed picks its accelerator once, on the first ``get_accelerator()`` call (often at
    ``import deepspeed``), from ``DS_ACCELERATOR`` or by probing for CUDA. Setting the variable
    here covers the ranks Lightning launches later (they inherit the environment and import
    DeepSpeed afresh); replacing an already chosen non-CPU accelerator covers this process.
    """
    os.environ["DS_ACCELERATOR"] = "cpu"
    from deepspeed.accelerator import real_accelerator

    current = real_accelerator.ds_accelerator
    if current is None or current._name != "cpu":
        from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

        real_accelerator.set_accelerator(CPU_Accelerator())

    # DeepSpeed's torch comm backend JIT-compiles a shared-memory all-reduce op (C++, OpenMP)
    # whenever the CPU accelerator is active: minutes on a cold cache with two busy cores, and
    # a compiler on every node. Only tensor-parallel *inference* uses it (inference_all_reduce);
    # ZeRO training goes through gloo. deepspeed.ops caches its op probe in one module-level
    # dict ("edits to it persist", says its source), so marking the op unavailable skips the build.
    import deepspeed.ops

    try:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except (AttributeError, TypeError):  # another DeepSpeed layout: worst case the op gets built
        log.warning("could not disable DeepSpeed's shm_comm op build; the first run may compile it")


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy on CPU processes: gloo, DeepSpeed's CPU accelerator, fp32/bf16.

    For tests and CPU-only clusters; on CUDA use ``DeepSpeedStrategy`` (``build_strategy``
    chooses). Each override below exists because the parent assumes CUDA at that point.
    fp16 is refused: DeepSpeed's CPU accelerator has no fp16 support.
    """

    strategy_name = "deepspeed_cpu"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        use_deepspeed_cpu_accelerator()
        # gloo is the only collective backend torch ships for CPU tensors. DeepSpeed would
        # otherwise ask its accelerator, which says "ccl" when oneCCL happens to be installed.
        kwargs.setdefault("process_group_backend", "gloo")
        super().__init__(*args, **kwargs)
        if self.config is not None and "zero_optimization" in self.config:
            # With offload_optimizer DeepSpeed refuses a torch optimizer unless this is off:
            # its fast DeepSpeedCPUAdam is a C++ op compiled on first use. On CPU the
            # "offload" moves nothing, so a torch optimizer is the sensible default here.
            self.config.setdefault("zero_force_ds_cpu_optimizer", False)

    def setup_environment(self) -> None:
        # The parent raises unless the accelerator is CUDAAccelerator; skip that check only.
        if self.precision_plugin.precision in ("16-mixed", "16-true"):
            raise SoraError(
                f"strategy {self.strategy_name}: precision={self.precision_plugin.precision!r} is not "
                "supported on CPU (DeepSpeed's CPU accelerator has no fp16); use '32-true' or 'bf16-mixed'"
            )
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        # The parent first checks that device indices equal local ranks (cuda:0, cuda:1, ...);
        # CPU devices have no index, so that check always fails. Everything else is the same.
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | None, lr_scheduler: Any = None
    ) -> tuple[deepspeed.DeepSpeedEngine, torch.optim.Optimizer]:
        # The parent passes device_rank=root_device.index, which is None for "cpu" and makes
        # DeepSpeed compare None >= 0. Same call with the local rank (the CPU device ignores it).
        params = [p for p in model.parameters() if p.requires_grad]
        return self._deepspeed_initialize(model, self.config, params, optimizer, lr_scheduler)

    def _initialize_deepspeed_inference(self, model: nn.Module) -> None:
        # Same device_rank problem on the validate/test/predict path; the body mirrors the parent.
        from lightning.pytorch.strategies.deepspeed import remove_module_hooks

        assert isinstance(self.config, dict)
        config: dict[str, Any] = {"train_micro_batch_size_per_gpu": 1}  # DeepSpeed's timers need it
        if "bf16" in self.config:
            config["bf16"] = self.config["bf16"]
        if self.zero_stage_3:
            config["zero_allow_untested_optimizer"] = self.config["zero_allow_untested_optimizer"]
            config["zero_optimization"] = self.config["zero_optimization"]
        remove_module_hooks(model)
        self.model, _ = self._deepspeed_initialize(model, config, [], None, None)

    def _deepspeed_initialize(
        self, model: nn.Module, config: dict[str, Any] | None, params: list, optimizer: Any, lr_scheduler: Any
    ) -> tuple[deepspeed.DeepSpeedEngine, Any]:
        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank),
            config=config,
            model=model,
            model_parameters=params,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            dist_init_required=False,
        )
        return engine, ds_optimizer


def _timeout(value: float | timedelta | None) -> timedelta | None:
    if value is None or isinstance(value, timedelta):
        return value
    return timedelta(seconds=float(value))


def build_strategy(name: str, accelerator: str = "auto", **options: Any) -> Strategy | str:
    """Build the Lightning strategy for ``name`` with ``options``.

    Args:
        name: one of ``STRATEGY_NAMES``: ``auto`` (Lightning picks), ``ddp``,
            ``deepspeed_stage_{1,2,3}``, ``deepspeed_stage_{2,3}_offload``.
        accelerator: ``auto`` (CUDA if ``torch.cuda.is_available()``), ``cuda`` or ``cpu``;
            decides between DeepSpeedStrategy and CPUDeepSpeedStrategy, and DDP's backend.
        **options: for ``ddp``: ``process_group_backend``, ``timeout`` (seconds),
            ``find_unused_parameters``, ``static_graph``, ``gradient_as_bucket_view``,
            ``bucket_cap_mb``, ``broadcast_buffers``. For DeepSpeed: any argument of
            ``lightning.pytorch.strategies.DeepSpeedStrategy`` (``allgather_bucket_size``,
            ``reduce_bucket_size``, ``overlap_comm``, ``contiguous_gradients``,
            ``offload_optimizer[_device]``, ``offload_parameters``, ``offload_params_device``,
            ``partition_activations``, ``cpu_checkpointing``, ``logging_batch_size_per_gpu``, ...)
            plus ``zero_force_ds_cpu_optimizer`` and ``zero_extra`` (a dict of further
            ``zero_optimization`` keys); ``timeout`` is in seconds.

    Returns:
        ``"auto"`` for ``auto``, otherwise a ``Strategy`` instance.

    Raises:
        SoraError: unknown name, accelerator or option.
    """
    if name not in STRATEGY_NAMES:
        raise SoraError(f"unknown strategy {name!r}; valid names: {', '.join(STRATEGY_NAMES)}")
    if accelerator not in ("auto", "cuda", "cpu"):
        raise SoraError(f"strategy {name}: unknown accelerator {accelerator!r}; valid: auto, cuda, cpu")
    on_cuda = torch.cuda.is_available() if accelerator == "auto" else accelerator == "cuda"

    if name == "auto":
        if options:
            raise SoraError(f"strategy auto takes no options, got: {', '.join(sorted(options))}")
        return "auto"

    if "timeout" in options:
        options["timeout"] = _timeout(options["timeout"])

    if name == "ddp":
        unknown = set(options) - _DDP_OPTIONS
        if unknown:
            raise SoraError(
                f"strategy ddp: unknown option(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(_DDP_OPTIONS))}"
            )
        if not on_cuda:
            # Lightning picks gloo for CPU devices too, but only at setup; fix it here so the
            # choice is visible (and nccl can't be asked for on a CPU run by accident).
            options.setdefault("process_group_backend", "gloo")
        return DDPStrategy(**options)

    valid = _deepspeed_options()
    unknown = set(options) - valid
    if unknown:
        raise SoraError(
            f"strategy {name}: unknown option(s) {', '.join(sorted(unknown))}; valid: {', '.join(sorted(valid))}"
        )
    kwargs = {**_DEEPSPEED_STAGES[name], **options}
    if kwargs.get("logging_batch_size_per_gpu", "auto") == "auto":
        # Lightning's "auto" reads DataLoader.batch_sampler.batch_size, which is None for our
        # loader (the dataset yields whole bucketed batches, batch_size=None) and crashes. The
        # value only feeds DeepSpeed's own throughput log, not the batches Lightning feeds it.
        kwargs["logging_batch_size_per_gpu"] = 1
    force_ds_cpu_optimizer = kwargs.pop("zero_force_ds_cpu_optimizer", None)
    zero_extra = kwargs.pop("zero_extra", None) or {}
    strategy = DeepSpeedStrategy(**kwargs) if on_cuda else CPUDeepSpeedStrategy(**kwargs)
    if strategy.config is None or "zero_optimization" not in strategy.config:
        if force_ds_cpu_optimizer is not None or zero_extra:
            raise SoraError(f"strategy {name}: zero_force_ds_cpu_optimizer/zero_extra need zero_optimization=true")
        return strategy
    if force_ds_cpu_optimizer is not None:
        strategy.config["zero_force_ds_cpu_optimizer"] = bool(force_ds_cpu_optimizer)
    strategy.config["zero_optimization"].update(dict(zero_extra))
    return strategy


def apply_parallelism(model: nn.Module, activation_checkpointing: bool = False, compile: bool = False) -> nn.Module:
    """Apply activation checkpointing, then ``torch.compile``, in torchtitan's fixed order.

    Sharding (DDP/ZeRO) comes last and is the strategy's job. Both steps act on every module
    that has a ``blocks`` ``nn.ModuleList`` (the DiT's transformer blocks, the VAE's stages):
    each block is checkpointed / compiled on its own, so compilation sees the checkpointed
    forward and graph breaks stay inside one block. Modifies ``model`` in place and returns it.

    Args:
        model: a single-device model.
        activation_checkpointing: recompute each block's activations in backward instead of
            storing them (non-reentrant ``torch.utils.checkpoint``): roughly one extra forward
            per step for activation memory of one block instead of all of them.
        compile: ``torch.compile`` each block (off on CPU tests: compile time dominates).

    Raises:
        SoraError: a step was asked for but the model has no ``blocks`` ModuleList.
    """
    if not (activation_checkpointing or compile):
        return model
    owners = [m for m in model.modules() if isinstance(getattr(m, "blocks", None), nn.ModuleList)]
    if not owners:
        raise SoraError(
            f"apply_parallelism: {type(model).__name__} has no submodule with a `blocks` nn.ModuleList; "
            "activation checkpointing and compile are applied per block"
        )
    for owner in owners:
        # A model that checkpoints its own blocks (the DiT's `activation_checkpointing=True`)
        # would recompute every block twice in backward if wrapped again.
        own = getattr(owner, "activation_checkpointing", False) is True
        if activation_checkpointing and own:
            log.warning("apply_parallelism: %s checkpoints its own blocks; not wrapping them again", type(owner).__name__)
        for block in owner.blocks:
            if activation_checkpointing and not own:
                checkpoint_block(block)
            if compile:
                block.compile()
    return model


def checkpoint_block(block: nn.Module) -> nn.Module:
    """Wrap ``block.forward`` in non-reentrant activation checkpointing (idempotent).

    Non-reentrant: works with keyword arguments, inputs that don't require grad, and ZeRO-3's
    parameter hooks. The wrapper is an instance attribute, so ``state_dict`` keys are unchanged.
    """
    if getattr(block, "_sora_checkpointed", False):
        return block
    # A method bound to the block, not a closure over it: copy.deepcopy (the EMA copy of a
    # checkpointed DiT) rebinds it to the copy, where a closure would keep running the original.
    block.forward = types.MethodType(_checkpointed_forward, block)  # type: ignore[method-assign]
    block._sora_checkpointed = True
    return block


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    inner = type(self).forward.__get__(self)
    if not torch.is_grad_enabled():  # eval / sampling: nothing to save, skip the wrapper
        return inner(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(inner, *args, use_reentrant=False, **kwargs)
