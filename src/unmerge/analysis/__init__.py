"""Analysis of trained decompositions: grouping subcomponents into components (mechanisms)."""
