"""ATSS + GFL one-stage detector built on gfl_ops (see DESIGN.md section 7)."""
