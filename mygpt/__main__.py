from mygpt.cli import main

raise SystemExit(main())
