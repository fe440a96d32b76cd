"""The programming model: steps, decisions, effects, slots, the join table.

Pure values and rules, no I/O and no clock reads of their own (the clock
protocol lives here; the runtime injects one). What a handler author writes
is built from these; everything else in zerver runs them.

May import: nothing of zerver outside this package.
"""
