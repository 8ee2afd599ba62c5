"""What people read: the Markdown of eval, export and bench, report.md / report.html, the recipe reference page,
and the hub-ready folders with their model cards (publish)."""
