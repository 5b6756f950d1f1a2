"""``python -m canary_demo``: set everything up and run two real rollouts end to end (``make demo``)."""

from canary_demo.main import main

raise SystemExit(main())
