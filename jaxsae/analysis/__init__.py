"""Offline analysis of trained dictionaries (any SAELens-format directory).

  stitch.py    SAEs of different widths: novel vs reconstruction latents, the MSE change of
               inserting each latent or swapping each parent/children group, Frankenstein SAEs
  geometry.py  one dictionary: firing density, activation histograms, co-firing, decoder
               neighbours and clusters (`jaxsae analyze`, with an index.html)
"""
