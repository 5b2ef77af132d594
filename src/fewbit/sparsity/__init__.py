"""N:M structured sparsity: masks (pure functions), ``sparsify_`` and ``summary``, channel permutations, the
compressed storage form, mask-keeping during training, and 2:4 sparse kernels on CUDA.

The workflow of the 2:4 paper (Mishra et al. 2021): train dense, prune once (:func:`sparsify_`), retrain with the
masks fixed (:class:`KeepMasks`, a callback of :func:`fewbit.train.train`), then quantize if wanted
(``quantize_`` keeps the zeros under every recipe).
"""

from fewbit.sparsity.masks import (
    CRITERIA,
    Pattern,
    as_matrix,
    check_nm,
    from_matrix,
    is_nm,
    magnitude_scores,
    nm_mask,
    parse_pattern,
    transposable_mask,
    wanda_scores,
)
from fewbit.sparsity.model import (
    LayerSparsity,
    SparsitySummary,
    apply_masks_,
    densify_,
    is_transposed,
    load_masks,
    masks,
    matrix_of,
    patterns,
    prunable,
    read_masks,
    save_masks,
    sparsify_,
    summary,
)
from fewbit.sparsity.permute import kept_score, search_permutation
from fewbit.sparsity.storage import CompressedNM, compress, compressed_bytes, load_compressed
from fewbit.sparsity.training import MASKS_FILE, KeepMasks

__all__ = ["CRITERIA", "MASKS_FILE", "CompressedNM", "KeepMasks", "LayerSparsity", "Pattern", "SparsitySummary",
           "apply_masks_", "as_matrix", "check_nm", "compress", "compressed_bytes", "densify_", "from_matrix", "is_nm",
           "is_transposed", "kept_score", "load_compressed", "load_masks", "magnitude_scores", "masks", "matrix_of",
           "nm_mask", "parse_pattern", "patterns", "prunable", "read_masks", "save_masks", "search_permutation",
           "sparsify_", "summary", "transposable_mask", "wanda_scores"]
