"""Analysis of trained decompositions: grouping subcomponents into components (`grouping`), ablations, unlearning
and monitoring (`interventions`), and feature splitting across dictionary widths (`splitting`)."""
