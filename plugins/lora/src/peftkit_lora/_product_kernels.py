"""Triton kernels of the LoRA fast path (:mod:`peftkit_lora.dropout_products`, the per-call merge of :mod:`peftkit_lora.kernels`); imported only where Triton is installed."""

import triton
import triton.language as tl


@triton.jit
def philox_words(seed, rows, k0, K, BLOCK_K: tl.constexpr, ROUNDS: tl.constexpr):
    """Four (BLOCK_M, BLOCK_K // 8) words of 32 random bits for the tile at (rows, k0): one Philox call per 8 elements, 16 bits each."""
    groups = (rows[:, None].to(tl.int64) * K + k0) // 8 + tl.arange(0, BLOCK_K // 8)[None, :]
    return tl.randint4x(seed, groups, ROUNDS)


@triton.jit
def kept(r0, r1, r2, r3, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_K) booleans: element ``8 c + j`` is kept where its 16 bits (half ``j % 2`` of word ``j // 2``) reach ``threshold``."""
    lane = tl.arange(0, 8)[None, None, :]
    word = tl.where(lane < 2, r0[:, :, None], tl.where(lane < 4, r1[:, :, None], tl.where(lane < 6, r2[:, :, None], r3[:, :, None])))
    bits = tl.where(lane % 2 == 0, word, word >> 16) & 0xFFFF
    return tl.reshape(bits >= threshold, (BLOCK_M, BLOCK_K))


@triton.jit
def packed_kept(r0, r1, r2, r3, threshold):
    """The same mask packed, (BLOCK_M, BLOCK_K // 8) bytes, bit ``j`` for element ``8 c + j``: elementwise on the words, no reshuffle."""
    byte = ((r0 & 0xFFFF) >= threshold).to(tl.int32) | (((r0 >> 16) >= threshold).to(tl.int32) << 1)
    byte |= (((r1 & 0xFFFF) >= threshold).to(tl.int32) << 2) | (((r1 >> 16) >= threshold).to(tl.int32) << 3)
    byte |= (((r2 & 0xFFFF) >= threshold).to(tl.int32) << 4) | (((r2 >> 16) >= threshold).to(tl.int32) << 5)
    byte |= (((r3 & 0xFFFF) >= threshold).to(tl.int32) << 6) | (((r3 >> 16) >= threshold).to(tl.int32) << 7)
    return byte.to(tl.uint8)


@triton.jit
def unpack_kept(packed_tile, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_M, BLOCK_K) booleans from a (BLOCK_M, BLOCK_K // 8) tile of the packed mask."""
    lane = tl.arange(0, 8)[None, None, :]
    return tl.reshape(((packed_tile.to(tl.int32)[:, :, None] >> lane) & 1) != 0, (BLOCK_M, BLOCK_K))


@triton.jit(do_not_specialize=["seed"])
def down_kernel(
    x, a, h, packed, arrivals, M, K, R, COUNTERS, threshold, scale, seed, salt,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, ROUNDS: tl.constexpr,
):
    """``h = scale * keep * x a^T`` (``a`` rounded to ``x``'s dtype, the scale applied once to the float32 sum); the mask
    is also written packed, 8 elements per byte, and the backward kernel's ``COUNTERS`` arrival counters zeroed."""
    if tl.program_id(0) == 0:
        for c0 in range(0, COUNTERS, BLOCK_K):
            tl.store(arrivals + c0 + tl.arange(0, BLOCK_K), 0, mask=c0 + tl.arange(0, BLOCK_K) < COUNTERS)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rank = tl.arange(0, BLOCK_R)
    seed = seed + tl.load(salt)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x_tile = tl.load(x + rows[:, None] * K + cols[None, :], mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0)
        r0, r1, r2, r3 = philox_words(seed, rows, k0, K, BLOCK_K, ROUNDS)
        byte_cols = k0 // 8 + tl.arange(0, BLOCK_K // 8)
        tl.store(
            packed + rows[:, None] * (K // 8) + byte_cols[None, :], packed_kept(r0, r1, r2, r3, threshold),
            mask=(rows[:, None] < M) & (byte_cols[None, :] < K // 8),
        )
        keep = kept(r0, r1, r2, r3, threshold, BLOCK_M, BLOCK_K)
        dropped = tl.where(keep, x_tile, tl.zeros_like(x_tile))
        a_tile = tl.load(a + rank[None, :] * K + cols[:, None], mask=(rank[None, :] < R) & (cols[:, None] < K), other=0.0)
        acc = tl.dot(dropped, a_tile.to(x_tile.dtype), acc)
    tl.store(h + rows[:, None] * R + rank[None, :], (acc * scale).to(h.dtype.element_ty), mask=(rows[:, None] < M) & (rank[None, :] < R))


@triton.jit
def backward_tiles(x, grad_h, packed, rows, cols, byte_cols, rank, end, K, R):
    """The backward kernel's loads for one block of rows (those at or past ``end`` masked off): packed mask, ``grad_h``, ``x``."""
    packed_tile = tl.load(packed + rows[:, None] * (K // 8) + byte_cols[None, :], mask=(rows[:, None] < end) & (byte_cols[None, :] < K // 8), other=0)
    gh = tl.load(grad_h + rows[:, None] * R + rank[None, :], mask=(rows[:, None] < end) & (rank[None, :] < R), other=0.0)
    x_tile = tl.load(x + rows[:, None] * K + cols[None, :], mask=(rows[:, None] < end) & (cols[None, :] < K), other=0.0)
    return packed_tile, gh, x_tile


@triton.jit
def backward_kernel(
    x, spread_out, grad_h, a, packed, partial, arrivals, grad_a_out, M, K, R, rows_per_chunk, scale,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, INPUT_GRAD: tl.constexpr,
):
    """``spread_out = scale * keep * (grad_h a)`` (with ``INPUT_GRAD``) and ``grad_a_out = scale * grad_h^T (keep * x)``,
    the mask read packed, ``a`` rounded to ``x``'s dtype.

    Each program sums one chunk of rows for one block of columns into ``partial``; the last of a column block's
    programs to finish (counted in ``arrivals``, which the forward kernel zeroed and the last program zeroes again)
    adds up the chunks in a fixed order, so the result is deterministic and no separate reduction kernel runs.
    Each block of rows is loaded one iteration ahead, so its loads are in flight while the block before it computes.
    """
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    byte_cols = tl.program_id(0) * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    chunk = tl.program_id(1)
    rank = tl.arange(0, BLOCK_R)
    a_tile = tl.load(a + rank[:, None] * K + cols[None, :], mask=(rank[:, None] < R) & (cols[None, :] < K), other=0.0).to(x.dtype.element_ty)
    grad_a = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    first = chunk * rows_per_chunk
    end = min(M, first + rows_per_chunk)
    packed_tile, gh, x_tile = backward_tiles(x, grad_h, packed, first + tl.arange(0, BLOCK_M), cols, byte_cols, rank, end, K, R)
    for m0 in range(first, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        next_tiles = backward_tiles(x, grad_h, packed, rows + BLOCK_M, cols, byte_cols, rank, end, K, R)
        keep = unpack_kept(packed_tile, BLOCK_M, BLOCK_K)
        grad_a = tl.dot(tl.trans(gh), tl.where(keep, x_tile, tl.zeros_like(x_tile)), grad_a)
        if INPUT_GRAD:
            spread = tl.dot(gh, a_tile)  # (BLOCK_M, BLOCK_K): this tile of grad_h @ a
            inside = (rows[:, None] < end) & (cols[None, :] < K)
            tl.store(spread_out + rows[:, None] * K + cols[None, :], tl.where(keep, spread * scale, 0.0).to(spread_out.dtype.element_ty), mask=inside)
        packed_tile, gh, x_tile = next_tiles
    in_a = (rank[:, None] < R) & (cols[None, :] < K)
    tl.store(partial + chunk * R * K + rank[:, None] * K + cols[None, :], grad_a * scale, mask=in_a)
    tl.debug_barrier()  # all of this program's partial is written before it counts itself in
    chunks = tl.num_programs(1)
    if tl.atomic_add(arrivals + tl.program_id(0), 1, sem="acq_rel") == chunks - 1:
        total = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for first_chunk in range(0, chunks, 4):  # four independent loads in flight; ".cg" reads through L2, where the others wrote
            for other in tl.static_range(4):
                chunk_index = first_chunk + other + 0 * rank[:, None]  # the chunk, as a tensor the mask can broadcast
                chunk_a = partial + chunk_index * R * K + rank[:, None] * K + cols[None, :]
                total += tl.load(chunk_a, mask=in_a & (chunk_index < chunks), other=0.0, cache_modifier=".cg")
        tl.store(grad_a_out + rank[:, None] * K + cols[None, :], total.to(grad_a_out.dtype.element_ty), mask=in_a)
        tl.store(arrivals + tl.program_id(0), 0)  # every program of this block has arrived: ready for another backward


@triton.jit
def merge_kernel(
    w, b, a, out, N, K, R, swn, swk,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``out = w + b @ a`` for ``w (N, K)`` (any strides), ``b (N, R)``, ``a (R, K)``, summed in float32 and rounded once."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    rank = tl.arange(0, BLOCK_R)
    inside = (rows[:, None] < N) & (cols[None, :] < K)
    b_tile = tl.load(b + rows[:, None] * R + rank[None, :], mask=(rows[:, None] < N) & (rank[None, :] < R), other=0.0)
    a_tile = tl.load(a + rank[:, None] * K + cols[None, :], mask=(rank[:, None] < R) & (cols[None, :] < K), other=0.0)
    w_tile = tl.load(w + rows[:, None] * swn + cols[None, :] * swk, mask=inside, other=0.0)
    merged = tl.dot(b_tile, a_tile, w_tile.to(tl.float32))
    tl.store(out + rows[:, None] * K + cols[None, :], merged.to(out.dtype.element_ty), mask=inside)
