"""Shape arithmetic for kernel launches, on the host. Triton 3.6's `triton.cdiv` and
`triton.next_power_of_2` are constexpr functions: called from Python each unwraps its arguments
first, ~5 us a call on a 2-core CPU against ~0.04 us for the integer ops (and an eager mixed step
makes thousands of such calls). Inside @triton.jit code keep using tl.cdiv and friends."""
from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for integers, as triton.cdiv."""
    return -(-a // b)


def pow2(n: int) -> int:
    """The smallest power of two >= max(n, 1): a block size that holds n elements."""
    return 1 << max(0, int(n) - 1).bit_length()


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (0 for n <= 0), as triton.next_power_of_2."""
    n = int(n)
    return 1 << (n - 1).bit_length() if n > 0 else 0
