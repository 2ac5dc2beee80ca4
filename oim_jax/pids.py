"""Identity labels (pids): one convention for the data, the OIM loss and the
RoI head.

  pid >= 0    a labeled identity: train ids 0..L-1 (the OIM lookup-table
              row), test ids numbered by query.
  UNLABELED   a person without an identity; OIM pushes its feature into the
              circular queue.
  IGNORE      not a person for OIM: padded GT slots and background RoIs.
"""

UNLABELED = -1
IGNORE = -2
