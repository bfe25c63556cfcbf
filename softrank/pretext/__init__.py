"""Self-supervision by shuffling and reordering patches (Carr et al. 2021, "Shuffle to Learn").

- :mod:`softrank.pretext.patches`: split images, spectrograms, videos and 1-D
  signals into patches, and merge them back exactly;
- :mod:`softrank.pretext.permutations`: uniform permutations over all ``n!``,
  applying and inverting them, fixed sets of maximal Hamming distance;
- :mod:`softrank.pretext.losses`: the reorder loss through
  ``softrank.torch.soft_rank``, the permutation classification loss and the
  Gumbel-Sinkhorn baseline;
- :mod:`softrank.pretext.models`: a small patch encoder and the pretext heads;
- :mod:`softrank.pretext.datasets`: data that needs no download;
- :mod:`softrank.pretext.demo`: pre-train, linear-probe, compare
  (``python -m softrank.pretext.demo --quick``).

Everything except ``patches`` needs PyTorch; ``softrank.torch`` is imported
only when the reorder loss is first called, and ``datasets``/``demo`` also
need scikit-learn, matplotlib and tqdm.
"""
