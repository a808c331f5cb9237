"""ParallelDims: the one description of how a job's ranks are laid out, and its DeviceMesh.

The mesh has named axes ``("pp", "dp", "sp")`` with pp outermost, so that the ranks of one
sequence-parallel group are neighbours (on one host, over NVLink) and pipeline stages are the
farthest apart. Flattened views serve the places that need several axes at once:

- ``"dp_sp"``: the ranks that hold replicas of the same parameters (gradient reduction, FSDP,
  the loss's token count);
- ``"dp"``: the ranks that read different data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["ParallelDims"]


@dataclass
class ParallelDims:
    """Degrees of pipeline (``pp``), data (``dp``) and sequence (``sp``) parallelism.

    ``dp = -1`` means "whatever is left": ``world_size // (pp * sp)``.
    """

    pp: int = 1
    dp: int = -1
    sp: int = 1
    world_size: int = 1
    _mesh: DeviceMesh | None = field(default=None, init=False, repr=False)
    _flat: dict[str, DeviceMesh] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("pp", "sp", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel.{name} must be a positive integer, got {value!r}")
        if self.dp == -1:
            if self.world_size % (self.pp * self.sp):
                raise ValueError(
                    f"parallel.pp * parallel.sp = {self.pp} * {self.sp} = {self.pp * self.sp} "
                    f"must divide the world size {self.world_size} (parallel.dp = -1 takes the "
                    f"rest)"
                )
            self.dp = self.world_size // (self.pp * self.sp)
        if not isinstance(self.dp, int) or self.dp < 1:
            raise ValueError(f"parallel.dp must be a positive integer or -1, got {self.dp!r}")
        if self.pp * self.dp * self.sp != self.world_size:
            raise ValueError(
                f"parallel.pp * parallel.dp * parallel.sp = {self.pp} * {self.dp} * {self.sp} = "
                f"{self.pp * self.dp * self.sp} does not match the world size {self.world_size}"
            )

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    @property
    def sp_enabled(self) -> bool:
        return self.sp > 1

    def coords(self, rank: int) -> dict[str, int]:
        """The (pp, dp, sp) coordinates of a global rank, matching the mesh's row-major order."""
        sp = rank % self.sp
        dp = (rank // self.sp) % self.dp
        pp = rank // (self.sp * self.dp)
        return {"pp": pp, "dp": dp, "sp": sp}

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """Build (once) the named mesh ``("pp", "dp", "sp")`` and its flattened ``"dp_sp"`` view.

        Needs ``torch.distributed`` initialised with ``world_size`` ranks.
        """
        if self._mesh is None:
            if dist.get_world_size() != self.world_size:
                raise ValueError(
                    f"ParallelDims was made for {self.world_size} ranks but the process group "
                    f"has {dist.get_world_size()}"
                )
            mesh = init_device_mesh(
                device_type, (self.pp, self.dp, self.sp), mesh_dim_names=("pp", "dp", "sp")
            )
            # Keep the flattened view ourselves: slicing it back out of the root mesh is
            # deprecated in recent torch.
            self._flat = {"dp_sp": mesh["dp", "sp"]._flatten(mesh_dim_name="dp_sp")}
            self._mesh = mesh
        return self._mesh

    @property
    def mesh(self) -> DeviceMesh:
        if self._mesh is None:
            raise RuntimeError("call ParallelDims.build_mesh(device_type) first")
        return self._mesh

    def submesh(self, name: str) -> DeviceMesh:
        """The 1-D mesh of one axis (``"pp"``, ``"dp"``, ``"sp"``) or the flattened ``"dp_sp"``."""
        if name in self._flat:
            return self._flat[name]
        return self.mesh[name]

    def group(self, name: str) -> dist.ProcessGroup:
        """The process group of one mesh axis (``"pp"``, ``"dp"``, ``"sp"``) or ``"dp_sp"``."""
        return self.submesh(name).get_group()

    def local_rank_in(self, name: str) -> int:
        return self.submesh(name).get_local_rank()
