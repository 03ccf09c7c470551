"""Ops: one module per op, each with an ``impl=`` dispatch and a pure-torch reference."""
