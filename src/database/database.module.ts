import { type DynamicModule, Global, Module, type OnApplicationShutdown } from '@nestjs/common';
import { DataSource } from 'typeorm';
import type { OpenedDatabase } from './data-source.js';

/** Hands out the one DataSource; features own their entities, repositories and migrations. */
export abstract class Database {
  declare readonly dataSource: DataSource;
  declare readonly kind: OpenedDatabase['kind'];
}

class DatabaseLifecycle implements OnApplicationShutdown {
  constructor(private readonly opened: OpenedDatabase) {}
  async onApplicationShutdown(): Promise<void> {
    await this.opened.close();
  }
}

@Global()
@Module({})
export class DatabaseModule {
  /** The database is opened (and migrated) before the module graph is built; see main.ts. */
  static forRoot(opened: OpenedDatabase): DynamicModule {
    return {
      module: DatabaseModule,
      providers: [
        { provide: Database, useValue: { dataSource: opened.dataSource, kind: opened.kind } satisfies Database },
        { provide: DataSource, useValue: opened.dataSource },
        { provide: DatabaseLifecycle, useFactory: () => new DatabaseLifecycle(opened) },
      ],
      exports: [Database, DataSource],
    };
  }
}
