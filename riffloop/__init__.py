"""Riffloop: improving AI-generated music from its listeners (arXiv 2506.04852).

Subpackages (see docs/ARCHITECTURE.md): ``riffloop.core`` (settings, errors, ports and adapters),
``riffloop.infra`` (local servers), ``riffloop.music`` (the ML core), ``riffloop.loop`` (the
human-computation loop's rules), ``riffloop.sim`` (simulated listeners and the demo that drives
the loop), ``riffloop.runtime`` (what every service process shares).
Importing this package imports nothing heavy.
"""
