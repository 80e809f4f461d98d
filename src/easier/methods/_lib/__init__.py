"""Private helpers shared by several methods (budgets, blocks, graph walks, warm-up, MSW)."""
