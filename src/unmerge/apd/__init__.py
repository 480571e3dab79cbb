"""Attribution-based Parameter Decomposition (APD), the baseline SPD replaced (`method.kind: apd`)."""
