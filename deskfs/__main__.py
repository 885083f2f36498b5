from deskfs.cli import main

raise SystemExit(main())
