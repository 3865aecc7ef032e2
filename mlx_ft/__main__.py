from mlx_ft.cli import main

main()
