"""Benchmarks of the attention paths (`attention`) and of the AA detector against its baseline (`model`),
and the rendering of BENCHMARKS.md from their JSON results (`report`); `common` holds the one timing loop
they share (tables: `aa_detection.utils.table`). The tools in tools/ parse the flags these modules define and call them."""
