"""One module per tab: each has build(ctx) that lays out the tab's components and wires its events."""
