"""The bucket defaults the README documents, written by hand.

Tests compare what the worker resolves with these, never with the worker's own constants: a
value read from the code under test could not catch the code changing.
"""

#: Batch buckets of a dynamic batch dim that nothing declares.
BATCH_SIZES = (1, 2, 4, 8, 16, 32)
#: Token-length buckets of a dynamic sequence dim, before the model's own limit caps them.
SEQUENCE_LENGTHS = (8, 16, 24, 32, 48, 64, 96, 128)
