"""Graph-matching affinities: build ``K`` fast (Numba / torch), or never build it.

* :func:`build_aff_mat` -- pygmtools-compatible builder returning ``K`` (dense array, sparse
  matrices, or a matrix-free operator);
* :func:`graph_matching_problem` -- the same arguments, as a :class:`~qapfuse.Problem`;
* kernels: :func:`inner_product_kernel`, :func:`gaussian_kernel`, :func:`custom_kernel`;
* :class:`EdgeFactorAffinity` -- ``K vec(X)`` as ``sum_t A_t X B_t^T`` (exact for the inner
  product, a Taylor expansion with a stated error bound for the Gaussian);
* :class:`CSRAffinity` -- a sparse ``K`` (CSR) whose symmetry is known from the graphs, and
  optionally its candidate pairs.

The modules behind this namespace are private: ``_builders`` (the two public builders),
``_inputs`` (input checks), ``_assemble`` (``K`` from checked graphs), ``_numba_kernels``
(compiled on first use, cached on disk), ``_kernel`` (the kernel objects), ``_operator``
(:class:`EdgeFactorAffinity`) and ``_sparse`` (:class:`CSRAffinity`). Importing this package
does not import Numba or scipy.special; the first numpy build does.
"""

from ._builders import build_aff_mat, graph_matching_problem
from ._kernel import Kernel, custom_kernel, gaussian_kernel, inner_product_kernel
from ._operator import EdgeFactorAffinity, gaussian_terms
from ._sparse import CSRAffinity

__all__ = [
    "CSRAffinity",
    "EdgeFactorAffinity",
    "Kernel",
    "build_aff_mat",
    "custom_kernel",
    "gaussian_kernel",
    "gaussian_terms",
    "graph_matching_problem",
    "inner_product_kernel",
]
