"""Everything that computes an edit: covariance, keys, attribution, clusters, z, the solve, the sequential editor, and the method registry."""
