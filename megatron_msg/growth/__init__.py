"""MSG growth: masks, operators, optimizer-state remapping, schedules."""
