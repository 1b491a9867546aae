from mnist_opt.cli import main

raise SystemExit(main())
