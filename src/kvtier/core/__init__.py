"""kvtier.core: pure building blocks (layout, keys, chunk codec, config, errors, metric names).

Nothing here imports torch or an inference engine; everything is a pure function or
a frozen dataclass, tested to the byte.
"""
