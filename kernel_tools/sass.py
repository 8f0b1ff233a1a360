"""Read what Triton built for sm_90: resources, SASS, loops, tensor-core instructions, occupancy.

Everything comes from the cubin through the `cuobjdump` that Triton ships (`-res-usage` for
registers, stack and shared memory; `-sass` for the instructions), so it needs no GPU.
- Loops are backward branches (`BRA` to a lower address). The *main loop* is, among the loops that
  contain no other loop, the one with the most tensor-core instructions, the first in program order
  of equals (an unmasked main loop before its masked tail), or without MMA the largest (a row loop).
  Its size is the count of SASS instructions from the branch target to the branch, i.e. issued per
  iteration per warp.
  Loops other than the main loop (a masked tail, a mask-row scan) are taken as not run: the report
  models full packed blocks, where an attention kernel's masked tail has no block left to do.
- Spill bytes are the static widths of local-memory stores and loads (`STL`/`LDL`), which is what
  `ptxas -v` reports as spill stores/loads.
- Tensor cores: `HGMMA` (Hopper warpgroup MMA, `wgmma`), `HMMA` (`mma.sync`); TMA: `UTMALDG`/`UTMASTG`.
- Occupancy (CTAs per SM) from the sm_90 limits of roberta_kernels/sm90.py: registers (allocated per warp
  in units of REG_ALLOC_UNIT), shared memory (each CTA's count includes the block that sm_90
  reserves per CTA, which cuobjdump reports as static shared memory), warps and CTAs per SM.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

from triton import knobs

from roberta_kernels import sm90

_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRA = re.compile(r"\bBRA(?:\.[A-Z.]+)?\s+(?:`\()?(0x[0-9a-f]+)")
_WIDTH = re.compile(r"\.[US]?(8|16|32|64|128)\b")
_HGMMA = re.compile(r"HGMMA\.(\d+)x(\d+)x(\d+)")
_HMMA = re.compile(r"HMMA\.(16)(8)(8|16)\b")  # m16 n8 k8/k16
_RES = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


@dataclass
class Loop:
    start: int  # index of the first instruction
    end: int  # index of the backward branch

    @property
    def size(self) -> int:
        return self.end - self.start + 1


@dataclass
class KernelBinary:
    name: str
    num_warps: int
    regs: int
    stack_bytes: int
    smem_bytes: int  # dynamic (Triton's metadata.shared) + static
    spill_store_bytes: int
    spill_load_bytes: int
    sass: list[str]  # one instruction per entry, predicates included
    main_loop: Loop | None
    loops: list[Loop]  # every loop that contains no other loop, the main loop included

    @property
    def spill_bytes(self) -> int:
        return self.spill_store_bytes + self.spill_load_bytes

    def count(self, pattern: str, loop_only: bool = False) -> int:
        lines = self.loop_sass if loop_only else self.sass
        return sum(1 for s in lines if re.search(pattern, s))

    @property
    def loop_sass(self) -> list[str]:
        return self.sass[self.main_loop.start : self.main_loop.end + 1] if self.main_loop else []

    @property
    def straight_sass(self) -> list[str]:
        """Instructions outside every innermost loop (run once per warp)."""
        inside = {i for lp in self.loops for i in range(lp.start, lp.end + 1)}
        return [s for i, s in enumerate(self.sass) if i not in inside]

    @property
    def all_loop_sass(self) -> list[str]:
        return [s for lp in self.loops for s in self.sass[lp.start : lp.end + 1]]

    @property
    def loop_instructions(self) -> int:
        return self.main_loop.size if self.main_loop else 0

    @property
    def wgmma(self) -> int:
        return self.count(r"\bHGMMA\.")

    @property
    def mma_sync(self) -> int:
        return self.count(r"\bHMMA\.")

    @property
    def tma(self) -> int:
        return self.count(r"\bUTMA(LDG|STG)\b")

    @property
    def ctas_per_sm(self) -> int:
        unit = sm90.REG_ALLOC_UNIT
        regs_per_warp = -(-max(self.regs, 1) * sm90.WARP_SIZE // unit) * unit
        by_regs = sm90.REGS_PER_SM // (regs_per_warp * self.num_warps)
        by_smem = sm90.SHARED_BYTES_PER_SM // max(self.smem_bytes, 1)
        return max(0, min(by_regs, by_smem, sm90.MAX_WARPS_PER_SM // self.num_warps, sm90.MAX_CTAS_PER_SM))

    def mma_flops(self, lines: list[str]) -> int:
        """Tensor-core FLOPs issued by one warp running `lines` (an HGMMA is issued by a warpgroup of 4
        warps, an HMMA by one warp)."""
        flops = 0
        for s in lines:
            if m := _HGMMA.search(s):
                flops += 2 * int(m[1]) * int(m[2]) * int(m[3]) // 4
            elif m := _HMMA.search(s):
                flops += 2 * int(m[1]) * int(m[2]) * int(m[3])
        return flops

    def global_bytes(self, lines: list[str]) -> int:
        """Bytes one warp asks of global memory (loads, stores, cp.async) running `lines`."""
        total = 0
        for s in lines:
            op = s.split()[0] if not s.startswith("@") else s.split()[1]
            if op.startswith(("LDG", "STG", "RED", "ATOM")) and not op.startswith("LDGDEPBAR"):
                m = _WIDTH.search(op)
                total += sm90.WARP_SIZE * (int(m[1]) // 8 if m else 4)
        return total


def _tool(*args: str) -> str:
    return subprocess.run(
        [knobs.nvidia.cuobjdump.path, *args], capture_output=True, text=True, check=True
    ).stdout


def _local_bytes(lines: list[str], op: str) -> int:
    total = 0
    for s in lines:
        words = s.split()
        mnemonic = words[1] if words[0].startswith("@") else words[0]
        if mnemonic.split(".")[0] == op:
            m = _WIDTH.search(mnemonic)
            total += int(m[1]) // 8 if m else 4
    return total


def _innermost_loops(addrs: list[int], sass: list[str]) -> list[Loop]:
    index = {a: i for i, a in enumerate(addrs)}
    loops = []
    for i, s in enumerate(sass):
        m = _BRA.search(s)
        if m and (t := int(m[1], 16)) < addrs[i] and t in index and i - index[t] > 2:
            loops.append(Loop(index[t], i))
    innermost = [
        lp for lp in loops if not any(o is not lp and lp.start <= o.start and o.end <= lp.end for o in loops)
    ]
    return innermost


def _main_loop(sass: list[str], innermost: list[Loop]) -> Loop | None:
    def rank(lp: Loop) -> tuple:
        # the loop with the most tensor-core instructions, the first of equals (an unmasked main loop
        # comes before its masked tail); without MMA, the largest loop
        mma = sum(1 for s in sass[lp.start : lp.end + 1] if "HGMMA." in s or "HMMA." in s)
        return (mma, -lp.start) if mma else (0, lp.size)

    return max(innermost, key=rank, default=None)


@functools.cache
def _disassemble(cubin: bytes) -> tuple[str, str]:
    fd, path = tempfile.mkstemp(suffix=".cubin")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(cubin)
        return _tool("-res-usage", path), _tool("-sass", path)
    finally:
        os.remove(path)


def inspect_kernel(kernel, name: str) -> KernelBinary:
    """Read a triton CompiledKernel built for sm_90."""
    res, sass_text = _disassemble(bytes(kernel.asm["cubin"]))
    m = _RES.search(res)
    regs, stack, static_smem = int(m[1]), int(m[2]), int(m[3])
    addrs, sass = [], []
    for line in sass_text.splitlines():
        if lm := _LINE.match(line):
            addrs.append(int(lm[1], 16))
            sass.append(lm[2])
    loops = _innermost_loops(addrs, sass)
    return KernelBinary(
        name=name,
        num_warps=kernel.metadata.num_warps,
        regs=regs,
        stack_bytes=stack,
        smem_bytes=kernel.metadata.shared + static_smem,
        spill_store_bytes=_local_bytes(sass, "STL"),
        spill_load_bytes=_local_bytes(sass, "LDL"),
        sass=sass,
        main_loop=_main_loop(sass, loops),
        loops=loops,
    )
