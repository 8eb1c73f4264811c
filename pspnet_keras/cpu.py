"""Whether this CPU computes bfloat16 in hardware, from the flags Linux lists in /proc/cpuinfo (proc(5)).

Two x86 instruction sets do: AVX512_BF16 (bfloat16 dot products into float32; AMD Zen 4
and later, Intel since Cooper Lake) and AMX's bfloat16 tile multiplications (Intel
Sapphire Rapids and later). Where the flags cannot be read (another system, or no "flags"
line), the CPU counts as having neither. This module imports nothing heavy.
"""

CPUINFO_PATH = "/proc/cpuinfo"
FLAGS_FIELD = "flags"
# The flags of the instruction sets that compute bfloat16, as Linux names them, and as a refusal names them.
AVX512_BF16_FLAG = "avx512_bf16"
AMX_BF16_FLAG = "amx_bf16"
BFLOAT16_FLAGS = (AVX512_BF16_FLAG, AMX_BF16_FLAG)
BFLOAT16_SETS = "AVX512_BF16 or AMX"
# The wider vector sets a refusal says the CPU has instead, widest first, with their usual names.
VECTOR_SETS = {"avx512f": "AVX-512", "avx2": "AVX2", "avx": "AVX"}


def cpu_flags(path=CPUINFO_PATH):
    """The flags of the first processor listed in `path` (a set of names such as 'avx2'), or None where
    they cannot be read."""
    try:
        with open(path, encoding="ascii", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == FLAGS_FIELD:
                    return frozenset(value.split())
    except OSError:
        return None
    return None


def computes_bfloat16(flags=None):
    """Whether a CPU with `flags` (this one's, cpu_flags(), by default) has AVX512_BF16 or AMX's bfloat16."""
    flags = cpu_flags() if flags is None else flags
    return any(flag in (flags or ()) for flag in BFLOAT16_FLAGS)


def bfloat16_absence(flags=None):
    """What a CPU with `flags` (this one's by default) has instead of AVX512_BF16 and AMX, in words:
    'this CPU has AVX2 but neither', or that its instruction sets are unknown."""
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return f"this CPU's instruction sets are unknown here (no {FLAGS_FIELD} line in {CPUINFO_PATH})"
    widest = next((name for flag, name in VECTOR_SETS.items() if flag in flags), None)
    return f"this CPU has {widest} but neither" if widest else "this CPU has neither"
