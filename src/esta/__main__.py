from esta.cli import main

raise SystemExit(main())
